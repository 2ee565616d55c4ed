"""End-to-end generation: against transformers' ``generate``, per-row independence, EOS/pad rules,
infilling clamps, compile reuse and argument errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    DiffusionGemmaGenerationConfig,
    DiffusionGemmaGenerationMixin,
    EntropyBoundSamplerConfig,
)

import dgemma_jax
from dgemma_jax import generation as gen
from dgemma_jax import sampling
from tests import oracle

CANVAS = 8
VOCAB = 128  # oracle.text_config
# Besides Gemma's [1, 106, 50], a few more ids end a row so that EOS lands mid-run on a random model.
EOS = [1, 106, 50, 7, 61, 90]
PAD = 0
# A temperature of 1e-5..2e-5 makes the tempered softmax one-hot wherever the top two logits differ
# by more than ~5e-4: candidate draws equal the argmax, every entropy is ~0 so every position is
# accepted and nothing is re-noised. The run is then a function of the initial canvas of each block,
# which the test feeds to transformers; everything else (self-conditioning, per-row stopping and
# freezing, commits into the cache, EOS and pad rules, the pass count) is compared token for token.
# (A near-tie of two logits, within the ~1e-5 float32 difference of the two implementations, would
# make a draw differ; the seeds below hit none, and torch is seeded so the check is repeatable.)
DETERMINISTIC = dict(max_denoising_steps=6, t_min=1e-5, t_max=2e-5, entropy_bound=0.1, stability_threshold=1,
                     confidence_threshold=0.005)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    hf = oracle.build(seed=5, canvas_length=CANVAS)
    path = oracle.save(hf, tmp_path_factory.mktemp("generate") / "ckpt")
    settings = {k: v for k, v in DETERMINISTIC.items() if k != "entropy_bound"}
    (path / "generation_config.json").write_text(json.dumps(
        dict(settings, sampler_config={"entropy_bound": DETERMINISTIC["entropy_bound"]}, eos_token_id=EOS,
             pad_token_id=PAD, max_new_tokens=4 * CANVAS)))
    return hf, path


@pytest.fixture(scope="module")
def model(checkpoint):
    return dgemma_jax.from_pretrained(checkpoint[1], dtype="float32")


def transformers_generate(hf, prompt: np.ndarray, seed: int, max_new_tokens: int, monkeypatch, **overrides):
    """transformers' generate, started from the same initial canvas per block as ours with ``seed``."""
    row_keys = gen.row_keys_from_seeds([seed] * prompt.shape[0])
    starts = iter(range(64))
    original = DiffusionGemmaGenerationMixin._prepare_denoiser_inputs

    def with_our_canvas(self, **kwargs):
        init_keys, _ = gen.canvas_keys(row_keys, next(starts))
        canvas = np.asarray(sampling.initial_canvas(init_keys, CANVAS, VOCAB))
        kwargs["model_kwargs"]["decoder_input_ids"] = torch.from_numpy(canvas.astype(np.int64))
        return original(self, **kwargs)

    monkeypatch.setattr(DiffusionGemmaGenerationMixin, "_prepare_denoiser_inputs", with_our_canvas)
    settings = dict(DETERMINISTIC, **overrides)
    config = DiffusionGemmaGenerationConfig(
        sampler_config=EntropyBoundSamplerConfig(entropy_bound=settings.pop("entropy_bound")), eos_token_id=EOS,
        pad_token_id=PAD, max_new_tokens=max_new_tokens, **settings)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = hf.generate(torch.from_numpy(prompt.astype(np.int64)), generation_config=config)
    monkeypatch.undo()
    return out.sequences.numpy(), out.tokens_per_forward.numpy()


def test_matches_transformers_generate(checkpoint, model, monkeypatch):
    hf, _ = checkpoint
    rng = np.random.default_rng(0)
    max_new = 4 * CANVAS
    saw_early_eos = saw_several_canvases = saw_early_stop = False
    for trial in range(6):
        prompt = rng.integers(8, VOCAB, (1, int(rng.integers(3, 20))))
        # Even trials: every setting from generation_config.json. A random model's argmax canvas
        # rarely settles, so odd trials stop on confidence alone (stability 0): after one step.
        overrides = {} if trial % 2 == 0 else dict(stability_threshold=0)
        ours = dgemma_jax.generate(model, prompt, seed=trial, **overrides)
        want, want_tpf = transformers_generate(hf, prompt, trial, max_new, monkeypatch, **overrides)
        assert ours.sequences.shape == (1, prompt.shape[1] + max_new)
        np.testing.assert_array_equal(ours.sequences[:, :want.shape[1]], want, err_msg=f"trial {trial}")
        assert (ours.sequences[:, want.shape[1]:] == PAD).all()
        np.testing.assert_allclose(ours.tokens_per_forward, want_tpf, rtol=1e-6)
        new = ours.sequences[0, prompt.shape[1]:]
        saw_early_eos |= bool(np.isin(new[:-CANVAS], EOS).any())
        saw_several_canvases |= ours.steps.shape[1] > 1
        saw_early_stop |= bool((ours.steps < DETERMINISTIC["max_denoising_steps"]).any())
    assert saw_early_eos and saw_several_canvases and saw_early_stop  # the trials exercise each rule


def test_batch_matches_transformers(checkpoint, model, monkeypatch):
    """Equal-length rows in one batch: rows that finish stay frozen and uncounted, as in transformers."""
    hf, _ = checkpoint
    prompt = np.random.default_rng(1).integers(8, VOCAB, (4, 6))
    ours = dgemma_jax.generate(model, prompt, max_new_tokens=4 * CANVAS, seed=4)
    want, want_tpf = transformers_generate(hf, prompt, 4, 4 * CANVAS, monkeypatch)
    np.testing.assert_array_equal(ours.sequences[:, :want.shape[1]], want)
    np.testing.assert_allclose(ours.tokens_per_forward, want_tpf, rtol=1e-6)
    canvases_run = (ours.steps > 0).sum(axis=1)
    assert len(set(canvases_run.tolist())) > 1  # rows finished after different canvases (then ran frozen)


def test_attention_kernel_generate_matches_transformers(checkpoint, monkeypatch):
    """With the TPU attention kernel (interpret mode here) the cache is rounded up to whole key
    blocks (``cache_capacity``: 256 slots for 5 prompt tokens and two canvases), which the kernel
    takes without padding it or concatenating it with the canvas keys; the slots past the tokens
    change nothing."""
    hf, path = checkpoint
    kernel = dgemma_jax.from_pretrained(path, dtype="float32", attention_impl="pallas")
    capacities = []
    prefill = gen._prefill
    monkeypatch.setattr(gen, "_prefill", lambda *a: capacities.append(a[-1]) or prefill(*a))
    prompt = np.random.default_rng(2).integers(8, VOCAB, (2, 5))
    ours = dgemma_jax.generate(kernel, prompt, max_new_tokens=2 * CANVAS, seed=6)
    monkeypatch.undo()
    assert capacities == [256]
    want, want_tpf = transformers_generate(hf, prompt, 6, 2 * CANVAS, monkeypatch)
    np.testing.assert_array_equal(ours.sequences[:, :want.shape[1]], want)
    np.testing.assert_allclose(ours.tokens_per_forward, want_tpf, rtol=1e-6)


# ---- our own properties, at the default sampling temperature -----------------------------------
SAMPLING = dict(t_min=0.4, t_max=0.8, max_denoising_steps=8)


def test_same_seed_same_output_and_seed_matters(model):
    prompt = np.arange(10, 16)[None]
    a = dgemma_jax.generate(model, prompt, max_new_tokens=16, seed=3, **SAMPLING)
    b = dgemma_jax.generate(model, prompt, max_new_tokens=16, seed=3, **SAMPLING)
    c = dgemma_jax.generate(model, prompt, max_new_tokens=16, seed=4, **SAMPLING)
    np.testing.assert_array_equal(a.sequences, b.sequences)
    assert not np.array_equal(a.sequences, c.sequences)


@pytest.mark.parametrize("lengths", [(3, 14, 9), (3, 21, 9)])  # one prompt bucket; two buckets
def test_mixed_length_batch_rows_equal_their_solo_runs(model, lengths):
    """Each row of a mixed-length batch (left padded, or right padded with a mask) gives exactly the
    tokens it gives alone with the same seed: same positions, masks and random draws.

    Run at a near-zero temperature: a batch compiles to a different XLA program than a single row
    (other shapes, other fusions), so logits may differ in the last bits, and a random model's
    self-conditioning loop amplifies such bits into different draws within a few steps at sampling
    temperatures (the same tolerance the comparison with transformers relies on)."""
    settings = DETERMINISTIC
    rng = np.random.default_rng(2)
    prompts = [rng.integers(8, VOCAB, n).tolist() for n in lengths]
    seeds = [11, 12, 13]
    batch = dgemma_jax.generate(model, prompts, max_new_tokens=2 * CANVAS, seed=seeds, **settings)
    width = max(map(len, prompts))
    for row, (p, s) in enumerate(zip(prompts, seeds)):
        alone = dgemma_jax.generate(model, [p], max_new_tokens=2 * CANVAS, seed=s, **settings)
        assert batch.sequences[row, :width - len(p)].tolist() == [PAD] * (width - len(p))  # left padding
        np.testing.assert_array_equal(batch.sequences[row, width - len(p):], alone.sequences[0])
        np.testing.assert_array_equal(batch.steps[row, :alone.steps.shape[1]], alone.steps[0])
    # right padding with an attention mask gives the same rows
    right = np.full((3, width), PAD)
    mask = np.zeros((3, width), int)
    for row, p in enumerate(prompts):
        right[row, :len(p)], mask[row, :len(p)] = p, 1
    padded = dgemma_jax.generate(model, right, attention_mask=mask, max_new_tokens=2 * CANVAS, seed=seeds, **settings)
    np.testing.assert_array_equal(padded.sequences[:, width:], batch.sequences[:, width:])


def test_clamped_positions_never_change(model):
    max_new = 2 * CANVAS
    clamp = np.full(max_new, -1)
    clamp[[0, 5, 6, 7, 12]] = [20, 21, 22, 23, 24]  # across both canvases
    seen = []
    out = dgemma_jax.generate(model, np.arange(30, 40)[None], max_new_tokens=max_new, seed=0, clamp_ids=clamp,
                              on_step=seen.append, **SAMPLING)
    new = out.sequences[0, 10:]
    assert seen and {s.canvas_index for s in seen} == set(range(out.steps.shape[1]))
    for s in seen:
        offset = s.canvas_index * CANVAS
        fixed = clamp[offset:offset + CANVAS] >= 0
        np.testing.assert_array_equal(s.canvas[0, fixed], clamp[offset:offset + CANVAS][fixed])
        np.testing.assert_array_equal(s.argmax_canvas[0, fixed], clamp[offset:offset + CANVAS][fixed])
    kept = ~np.isin(new, [PAD]) | (clamp < 0)  # (positions after an EOS become pad)
    np.testing.assert_array_equal(new[(clamp >= 0) & kept], clamp[(clamp >= 0) & kept])
    assert (new[clamp < 0] != clamp[clamp < 0]).any()


def test_step_hook_sees_every_step(model):
    seen = []
    out = dgemma_jax.generate(model, np.arange(3, 9)[None], max_new_tokens=2 * CANVAS, seed=1, on_step=seen.append,
                              **SAMPLING)
    per_canvas = np.bincount([s.canvas_index for s in seen])
    np.testing.assert_array_equal(per_canvas, out.steps.max(axis=0))
    assert [s.step for s in seen if s.canvas_index == 0] == list(range(per_canvas[0]))
    last = [s for s in seen if s.canvas_index == 0][-1]
    committed = out.sequences[0, 6:6 + CANVAS]
    kept = committed != PAD  # (after an EOS the committed canvas holds pad)
    np.testing.assert_array_equal(last.argmax_canvas[0, kept], committed[kept])


def test_denoising_loop_compiles_once_per_shape(model):
    """Three canvases, two calls with different prompts (same bucket), seeds, lengths of output and
    sampler settings (they are traced per row): one compile of the per-canvas function and one of the
    prefill."""
    settings = dict(SAMPLING, confidence_threshold=0.0)  # no early stop: every canvas runs
    dgemma_jax.generate(model, np.arange(3, 8)[None], max_new_tokens=3 * CANVAS, seed=0, **settings)
    before = gen._denoise_and_commit._cache_size(), gen._prefill._cache_size()
    other = dict(settings, entropy_bound=0.3, t_max=0.9)
    out = dgemma_jax.generate(model, np.arange(9, 20)[None], max_new_tokens=3 * CANVAS - 2, seed=7, **other)
    assert out.steps.shape[1] == 3 and (out.steps == SAMPLING["max_denoising_steps"]).all()
    assert (gen._denoise_and_commit._cache_size(), gen._prefill._cache_size()) == before


# ---- EOS / pad rules against transformers' _finalize_canvas -----------------------------------
@pytest.mark.parametrize("pad_id", [0, None])
def test_finalize_canvas_matches_transformers(pad_id):
    rng = np.random.default_rng(3)
    prompt_len, batch, canvases = 4, 5, 3
    config = DiffusionGemmaGenerationConfig(eos_token_id=EOS[:3], pad_token_id=pad_id,
                                            max_new_tokens=canvases * CANVAS)
    criteria = DiffusionGemmaGenerationMixin._prepare_ar_stopping_criteria(None, config)
    ids = torch.from_numpy(rng.integers(8, VOCAB, (batch, prompt_len)))
    finished_theirs = torch.zeros(batch, dtype=torch.bool)
    finished_ours = np.zeros(batch, bool)
    ours_all = [ids.numpy()]
    for c in range(canvases):
        canvas = rng.integers(8, VOCAB, (batch, CANVAS))
        canvas[c % batch, 3] = EOS[c % 3]  # one EOS per canvas
        canvas[(c + 2) % batch, [1, 6]] = [EOS[0], EOS[2]]  # two EOS in one row
        ids = torch.cat([ids, torch.from_numpy(canvas)], dim=-1)
        ids, finished_theirs = DiffusionGemmaGenerationMixin._finalize_canvas(
            ids, finished_theirs, config, criteria, CANVAS, torch.tensor(EOS[:3]))
        tokens, finished_ours = gen.finalize_canvas(canvas, finished_ours, c == canvases - 1, EOS[:3], pad_id)
        ours_all.append(tokens)
        np.testing.assert_array_equal(finished_ours, finished_theirs.numpy())
    np.testing.assert_array_equal(np.concatenate(ours_all, axis=1), ids.numpy())


# ---- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    (dict(entropy_bound=-0.5), "entropy_bound must be >= 0"),
    (dict(max_denoising_steps=0), "max_denoising_steps must be an integer >= 1"),
    (dict(temprature=0.3), r"unknown sampler parameter\(s\) \['temprature'\]"),
    (dict(seed=[1, 2]), "got 2 seeds for a batch of 1"),
    (dict(clamp_ids=np.zeros(3, int)), r"clamp_ids: expected integers of shape \[1, 8\]"),
    (dict(clamp_ids=np.full(8, VOCAB)), r"clamp_ids: values must be -1 \(free\) or token ids in \[0, 128\)"),
    (dict(attention_mask=np.zeros((1, 4))), "every row needs at least one token"),
    (dict(attention_mask=np.ones((1, 3))), r"attention_mask: expected shape \(1, 4\)"),
])
def test_bad_arguments(model, kwargs, match):
    kwargs = dict(dict(max_new_tokens=CANVAS), **kwargs)
    with pytest.raises(ValueError, match=match):
        dgemma_jax.generate(model, np.arange(4)[None] + 8, **kwargs)


def test_prompt_token_out_of_vocab(model):
    with pytest.raises(ValueError, match="prompt_ids"):
        dgemma_jax.generate(model, np.array([[5, VOCAB]]), max_new_tokens=CANVAS)


def test_jitted_loop_has_no_host_round_trip_without_hook(model):
    """Without ``on_step`` the compiled canvas function holds no host callback."""
    lowered = gen._denoise_and_commit.lower(
        model.graphdef, model.state, gen._prefill(model.graphdef, model.state, np.zeros((1, 16), np.int32),
                                                  np.array([3], np.int32), 16 + CANVAS),
        gen.CanvasRows(gen.row_keys_from_seeds([0]), np.zeros(1, np.int32), np.zeros(1, bool),
                       np.full((1, CANVAS), -1, np.int32), np.zeros(1, bool), gen.eos_rows(EOS, 1),
                       sampling.SamplerConfig().params(1)), np.int32(0), with_hook=False)
    text = lowered.as_text()
    assert "while" in text and "callback" not in text
