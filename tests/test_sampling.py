"""The sampler pieces against transformers' own DiffusionGemma generation objects, same logits."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    DiffusionGemmaGenerationConfig,
    DiffusionGemmaGenerationMixin,
    EntropyBoundSampler,
    EntropyBoundSamplerConfig,
    LinearTemperatureScheduleLogitsProcessor,
    StableAndConfidentStoppingCriteria,
)

from dgemma_jax import sampling
from dgemma_jax.sampling import (
    EntropyBoundAcceptance,
    LinearTemperature,
    SamplerConfig,
    StableAndConfidentStop,
)

torch.set_num_threads(1)  # torch's thread pool is pathologically slow on small CI machines

SEEDS = (0, 1, 2, 3)


def random_logits(seed, b, l, v):
    """Logits with a spread of sharpness per position, so entropies range from ~0 to ~log V."""
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.3, 12.0, (b, l, 1))
    return (rng.standard_normal((b, l, v)) * scale).astype(np.float32)


def shapes(seed):
    rng = np.random.default_rng(100 + seed)
    return int(rng.integers(2, 4)), int(rng.integers(8, 17)), int(rng.integers(32, 51))


def hand_built_logits():
    """[3, 8, 32]: row 0 all positions tied, row 1 one dominating position among flat ones,
    row 2 pairs of tied entropies straddling the bound and several exactly-zero entropies."""
    v = 32
    x = np.zeros((3, 8, v), np.float32)
    x[0] = np.linspace(0.0, 1.0, v)  # every position the same distribution
    x[1, :, :] = np.linspace(0.0, 0.5, v)
    x[1, 5, 7] = 60.0  # dominates: entropy exactly 0
    x[2, :, :] = np.linspace(0.0, 4.0, v)
    x[2, [1, 3], 0] = 80.0  # two zero-entropy positions
    x[2, [0, 6], :] = np.linspace(0.0, 8.0, v)  # a tied pair, sharper than the rest
    return x


def torch_accept_mask(logits, bound):
    b, l, v = logits.shape
    sampler = EntropyBoundSampler(EntropyBoundSamplerConfig(entropy_bound=float(bound)), l, v, 48)
    canvas = torch.zeros((b, l), dtype=torch.long)
    sampler.accept_canvas(canvas, canvas + 1, torch.from_numpy(logits), torch.tensor(5, dtype=torch.int32))
    return sampler.accepted_token_mask.numpy()


# ---- temperature ---------------------------------------------------------------------------
@pytest.mark.parametrize("t_min,t_max,steps", [(0.4, 0.8, 48), (0.3, 1.1, 7), (0.0, 0.5, 3)])
def test_temperature_every_step(t_min, t_max, steps):
    logits = random_logits(0, 2, 8, 33)
    ref = LinearTemperatureScheduleLogitsProcessor(t_min, t_max, steps)
    ours = LinearTemperature.between(t_min, t_max, steps)
    for step in range(steps):  # transformers counts steps remaining: cur_step = steps - step
        cur_step = torch.tensor(steps - step, dtype=torch.int32)
        want = ref(None, torch.from_numpy(logits), cur_step=cur_step).numpy()
        # XLA multiplies by the reciprocal of a broadcast divisor: equal to within 1 ulp
        np.testing.assert_allclose(np.asarray(ours(jnp.asarray(logits), step)), want, rtol=1.2e-7, atol=0)
        same = torch.tensor(np.float32(ours.temperature(step)))
        assert float(ref(None, same, cur_step=cur_step)) == 1.0  # the very same float32 temperature
    assert float(ours.temperature(0)) == pytest.approx(t_max)
    assert float(ours.temperature(steps - 1)) == pytest.approx(t_min + (t_max - t_min) / steps)


def test_temperature_traced_step():
    ours = LinearTemperature.between(0.4, 0.8, 48)
    traced = jax.jit(ours.temperature)(jnp.int32(10))
    assert float(traced) == float(ours.temperature(10))


# ---- entropy and acceptance -----------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
def test_entropy_matches_categorical(seed):
    logits = random_logits(seed, *shapes(seed))
    logits[0, 0, :3] = -np.inf  # masked tokens contribute zero
    want = torch.distributions.Categorical(logits=torch.from_numpy(logits)).entropy().numpy()
    np.testing.assert_allclose(np.asarray(sampling.entropy(jnp.asarray(logits))), want, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("bound", [1e-9, 0.1, 0.5, 3.3, 50.0])
def test_acceptance_hand_built(bound):
    logits = hand_built_logits()
    want = torch_accept_mask(logits, bound)
    got = np.asarray(jax.jit(EntropyBoundAcceptance(bound).__call__)(sampling.entropy(jnp.asarray(logits))))
    np.testing.assert_array_equal(got, want)
    assert got.any(axis=-1).all()  # at least one per row


def test_acceptance_zero_bound():
    """transformers rejects a zero bound; ours accepts the lowest-entropy position of each row plus
    any whose (cumsum - own entropy) rounds to 0: a tiny entropy is absorbed by a large one, so row 1
    also accepts position 0, and row 2 accepts position 0 but not the second near-zero position 3."""
    got = np.asarray(EntropyBoundAcceptance(0.0)(sampling.entropy(jnp.asarray(hand_built_logits()))))
    want = np.zeros((3, 8), bool)
    want[0, 0] = want[1, [0, 5]] = want[2, [0, 1]] = True
    np.testing.assert_array_equal(got, want)


def test_acceptance_ties_straddle_the_bound():
    """Row 0: eight equal entropies h; a bound in [2h, 3h) accepts exactly three, lowest positions first."""
    logits = hand_built_logits()
    h = float(sampling.entropy(jnp.asarray(logits))[0, 0])
    got = np.asarray(EntropyBoundAcceptance(2.5 * h)(sampling.entropy(jnp.asarray(logits))))
    np.testing.assert_array_equal(got[0], [True] * 3 + [False] * 5)
    np.testing.assert_array_equal(got, torch_accept_mask(logits, 2.5 * h))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("bound", [0.1, 1.0, 6.0])
def test_acceptance_random(seed, bound):
    logits = random_logits(seed, *shapes(seed))
    want = torch_accept_mask(logits, bound)
    got = np.asarray(EntropyBoundAcceptance(bound)(sampling.entropy(jnp.asarray(logits))))
    np.testing.assert_array_equal(got, want)


def test_acceptance_random_is_not_trivial():
    counts = [np.asarray(EntropyBoundAcceptance(1.0)(sampling.entropy(jnp.asarray(random_logits(s, *shapes(s)))))).sum(-1)
              for s in SEEDS]
    counts = np.concatenate(counts)
    assert counts.min() >= 1 and (counts > 1).any() and (counts < 8).any()


# ---- candidates, top-k / top-p, renoise ------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
def test_top_k_top_p_filter_matches_warpers(seed):
    b, l, v = shapes(seed)
    logits = random_logits(seed, b, l, v)
    tied = logits.copy()
    tied[0, 0, :4] = np.sort(tied[0, 0])[-5]  # ties with the k-th value are kept
    for top_k, top_p in [(5, 1.0), (0, 0.9), (0, 0.3), (7, 0.8), (1, 1.0)]:
        # torch's unstable sort orders ties arbitrarily: top-p only without ties
        x = tied if top_p == 1.0 else logits
        flat = torch.from_numpy(x.reshape(b * l, v))  # transformers' TopP scatters on dim 1: 2-D only
        want = flat
        if top_k:
            want = TopKLogitsWarper(top_k)(None, want)
        if top_p < 1.0:
            want = TopPLogitsWarper(top_p)(None, want)
        got = sampling.filter_top_k_top_p(jnp.asarray(x), top_k, top_p)
        np.testing.assert_array_equal(np.asarray(got).reshape(b * l, v), want.numpy())


def test_sample_candidates():
    logits = jnp.asarray(random_logits(0, 3, 16, 40))
    key = jax.random.split(jax.random.key(0), 3)
    draw = sampling.sample_candidates(key, logits)
    assert draw.shape == (3, 16) and draw.dtype == jnp.int32
    assert ((draw >= 0) & (draw < 40)).all()
    np.testing.assert_array_equal(sampling.sample_candidates(key, logits, top_k=1), jnp.argmax(logits, -1))
    top5 = jax.lax.top_k(logits, 5)[1]
    drawn5 = sampling.sample_candidates(jax.random.split(jax.random.key(1), 3), logits, top_k=5)
    assert (top5 == drawn5[..., None]).any(-1).all()
    # a dominating token is always drawn; a flat row yields many different tokens
    sharp = jnp.zeros((1, 256, 40)).at[:, :, 7].set(60.0)
    assert (sampling.sample_candidates(key[:1], sharp) == 7).all()
    assert len(np.unique(sampling.sample_candidates(key[:1], jnp.zeros((1, 256, 40))))) > 20


def test_sample_candidates_follow_softmax():
    logits = jnp.log(jnp.asarray([0.6, 0.3, 0.1, 0.0]))
    draws = sampling.sample_candidates(jax.random.key(3)[None], jnp.broadcast_to(logits, (1, 20000, 4)))
    freq = np.bincount(np.asarray(draws).ravel(), minlength=4) / 20000
    np.testing.assert_allclose(freq, [0.6, 0.3, 0.1, 0.0], atol=0.015)


def test_sample_candidates_is_inverse_cdf_over_many_blocks():
    """A vocabulary of several blocks (and a ragged last one): each draw is the token where the uniform
    falls in a float64 cumulative distribution (rounding could move a draw only across a boundary
    within float32 error, which these draws do not come near); tokens of probability 0, a whole
    block of them included, are never drawn."""
    batch, length, vocab = 2, 512, 1000
    logits = np.asarray(random_logits(5, batch, length, vocab), np.float64) * 3
    logits[:, :, 256:512] = -np.inf  # the second block has no mass
    logits[:, :, 900:] = -np.inf
    keys = jax.random.split(jax.random.key(9), batch)
    got = np.asarray(sampling.sample_candidates(keys, jnp.asarray(logits, jnp.float32)))
    u = np.asarray(jax.vmap(lambda k: jax.random.uniform(k, (length,)))(keys), np.float64)  # the draws it makes
    p = np.exp(logits - logits.max(-1, keepdims=True))
    cdf = np.cumsum(p, -1)
    want = (cdf <= (u * cdf[..., -1])[..., None]).sum(-1)
    np.testing.assert_array_equal(got, want)
    assert len(np.unique(got)) > 300 and (np.isfinite(np.take_along_axis(logits, got[..., None], -1))).all()


def test_uniform_renoise():
    canvas = jnp.asarray(np.random.default_rng(0).integers(0, 50, (3, 16)), jnp.int32)
    accept = jnp.asarray(np.random.default_rng(1).random((3, 16)) < 0.4)
    outs = [sampling.uniform_renoise(jax.random.split(jax.random.key(k), 3), canvas, accept, 50) for k in range(4)]
    for out in outs:
        assert out.dtype == canvas.dtype and out.shape == canvas.shape
        np.testing.assert_array_equal(out[accept], canvas[accept])
        assert ((out >= 0) & (out < 50)).all()
    assert not np.array_equal(outs[0][~accept], outs[1][~accept])
    keys = jax.random.split(jax.random.key(0), 2)
    first = sampling.initial_canvas(keys, 256, 50)
    assert first.shape == (2, 256) and ((first >= 0) & (first < 50)).all() and len(np.unique(first)) == 50
    # one key per row: a row's draw does not depend on the other rows
    np.testing.assert_array_equal(sampling.initial_canvas(keys[1:], 256, 50)[0], first[1])


# ---- adaptive stopping ----------------------------------------------------------------------
def stopping_sequence():
    """6 steps, B=4, L=8, V=32. Row 0 stable and confident from step 1; row 1 stable, never
    confident; row 2 confident, its canvas changes at step 3; row 3 confident, changes every step."""
    rng = np.random.default_rng(0)
    b, l, v, n = 4, 8, 32, 6
    base = rng.integers(0, v, (b, l))
    canvases, logits = [], []
    for step in range(n):
        c = base.copy()
        if step >= 3:
            c[2, 0] = (base[2, 0] + 1) % v
        c[3, :] = (base[3] + step) % v
        x = np.zeros((b, l, v), np.float32)
        np.put_along_axis(x, c[..., None], 40.0, axis=-1)  # one-hot: entropy ~ 0
        x[1] = rng.standard_normal((l, v)) * 2
        x[2] *= 0.28 if step == 4 else 1.0  # one unconfident step for row 2
        canvases.append(c)
        logits.append(x)
    return canvases, logits


@pytest.mark.parametrize("stability", [0, 1, 2, 3])
@pytest.mark.parametrize("confidence", [0.005, 0.5])
def test_stopping_step_by_step(stability, confidence):
    canvases, logits = stopping_sequence()
    ref = StableAndConfidentStoppingCriteria(stability, confidence)
    ours = StableAndConfidentStop(stability, confidence)
    update = jax.jit(ours.update)
    decisions = []
    for canvas_round in range(2):  # two canvases: reset / init between them
        ref.reset()
        state = ours.init(4, 8)
        for c, x in zip(canvases, logits):
            want = ref(torch.from_numpy(c), torch.from_numpy(x)).numpy()
            state, got = update(state, jnp.asarray(c, jnp.int32), sampling.entropy(jnp.asarray(x)))
            np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"round {canvas_round}")
            decisions.append(want)
    decisions = np.stack(decisions)
    assert decisions.any() and not decisions.all()  # the sequence exercises both outcomes


# ---- tokens per forward ---------------------------------------------------------------------
@pytest.mark.parametrize("pad", [0, None])
def test_tokens_per_forward(pad):
    sequences = np.array([[5, 6, 7, 9, 1, 0, 0, 0],
                          [5, 6, 7, 9, 9, 9, 106, 0],
                          [5, 6, 7, 0, 0, 0, 0, 0]], np.int64)
    passes = np.array([4, 3, 2], np.int32)
    want = DiffusionGemmaGenerationMixin._compute_tokens_per_forward(
        torch.from_numpy(sequences), torch.from_numpy(passes), 3, pad).numpy()
    got = np.asarray(sampling.tokens_per_forward(sequences, passes, 3, pad))
    np.testing.assert_array_equal(got, want)


# ---- composition under jit -----------------------------------------------------------------
def test_pieces_compose_in_while_loop():
    config = SamplerConfig(max_denoising_steps=5)
    schedule, accept, stop = config.schedule(), config.acceptance(), config.stop()
    raw = jnp.asarray(random_logits(0, 2, 8, 32))

    def body(carry):
        step, key, canvas, state, done = carry
        key, k_draw, k_noise = jax.random.split(key, 3)
        k_draw, k_noise = jax.random.split(k_draw, 2), jax.random.split(k_noise, 2)
        tempered = schedule(raw + canvas[..., None] * 0.0, step)
        candidates = sampling.sample_candidates(k_draw, tempered)
        entropies = sampling.entropy(tempered)
        canvas = sampling.uniform_renoise(k_noise, candidates, accept(entropies), 32)
        state, now = stop.update(state, jnp.argmax(tempered, -1).astype(jnp.int32), entropies)
        return step + 1, key, canvas, state, done | now

    def cond(carry):
        return (carry[0] < config.max_denoising_steps) & ~carry[4].all()

    init = (jnp.int32(0), jax.random.key(0), sampling.initial_canvas(jax.random.split(jax.random.key(1), 2), 8, 32),
            stop.init(2, 8), jnp.zeros((2,), bool))
    steps, _, canvas, _, _ = jax.jit(lambda c: jax.lax.while_loop(cond, body, c))(init)
    assert canvas.shape == (2, 8) and 1 <= int(steps) <= 5


# ---- config ----------------------------------------------------------------------------------
def test_config_defaults_match_transformers():
    d = DiffusionGemmaGenerationConfig._get_default_generation_params()
    c = SamplerConfig().validate()
    assert (c.max_denoising_steps, c.t_min, c.t_max, c.stability_threshold, c.confidence_threshold) == (
        d["max_denoising_steps"], d["t_min"], d["t_max"], d["stability_threshold"], d["confidence_threshold"])
    assert c.entropy_bound == d["sampler_config"].entropy_bound


def test_config_from_generation_config():
    hf = DiffusionGemmaGenerationConfig(max_denoising_steps=32, t_min=0.3, t_max=0.9, stability_threshold=2,
                                        confidence_threshold=0.01,
                                        sampler_config=EntropyBoundSamplerConfig(entropy_bound=0.25))
    raw = json.loads(hf.to_json_string())
    c = SamplerConfig.from_generation_config(raw)
    assert c == SamplerConfig(32, 0.3, 0.9, 0.25, 2, 0.01)
    assert SamplerConfig.from_generation_config(raw, t_min=None, entropy_bound=1.5).entropy_bound == 1.5
    assert SamplerConfig.from_generation_config({}) == SamplerConfig()
    with pytest.raises(ValueError, match="temprature"):
        SamplerConfig.from_generation_config(raw, temprature=0.5)


@pytest.mark.parametrize("field,value", [
    ("entropy_bound", -0.1), ("t_min", -0.1), ("t_max", 0.2), ("max_denoising_steps", 0),
    ("max_denoising_steps", 2.0), ("stability_threshold", -1), ("confidence_threshold", -1.0),
    ("top_k", -1), ("top_p", 0.0), ("top_p", 1.5),
])
def test_config_validate_names_the_parameter(field, value):
    with pytest.raises(ValueError, match=field):
        SamplerConfig(**{field: value}).validate()
    with pytest.raises(ValueError, match=field):
        SamplerConfig.from_generation_config({}, **{field: value})
