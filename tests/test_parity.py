"""Our canvas and encoder passes against transformers' DiffusionGemmaForBlockDiffusion.

Everything runs in float32 on CPU. Tolerance: max abs error <= 1e-4 on logits soft-capped to
|x| < 30 — float32 has ~7 significant digits, and the two implementations sum in different orders
(grouped vs per-expert matmuls, fused vs separate attention), which costs a few ulps per layer.
"""

import numpy as np
import pytest

import dgemma_jax
from tests import oracle

ATOL = 1e-4

CONFIGS = {
    # alternating layers; global head dim (16) != local (8); global KV heads (1) != local (2)
    "alternating": dict(),
    # top-1 routing and odd sizes everywhere
    "top1_odd": dict(
        vocab_size=97, hidden_size=40, intermediate_size=36, num_attention_heads=6, num_key_value_heads=3,
        head_dim=6, global_head_dim=10, num_global_key_value_heads=2, num_experts=5, top_k_experts=1,
        moe_intermediate_size=10, sliding_window=5,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
    ),
    # every expert chosen (top-k = all); full layer first; a run of sliding layers
    "topk_all": dict(
        num_experts=4, top_k_experts=4, sliding_window=6,
        layer_types=["full_attention", "sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
    ),
    # 5:1 pattern as in the 26B model, more experts, other RoPE settings on full layers
    "five_to_one": dict(
        num_experts=8, top_k_experts=3, sliding_window=7, global_head_dim=24,
        layer_types=["sliding_attention"] * 5 + ["full_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 500.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.5, "rope_theta": 20_000.0},
        },
    ),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    """(transformers model, our model loaded from its checkpoint) for one config."""
    seed = sorted(CONFIGS).index(request.param)
    ref = oracle.build(seed=seed, **CONFIGS[request.param])
    path = oracle.save(ref, tmp_path_factory.mktemp(request.param))
    return ref, dgemma_jax.from_pretrained(path, dtype="float32")


def _prompt_lengths(ref):
    window = ref.config.text_config.sliding_window
    return [max(1, window - 3), 2 * window + 3]  # shorter and longer than the sliding window


@pytest.mark.parametrize("batch", [1, 2])
def test_canvas_logits_match_transformers(pair, batch):
    ref, ours = pair
    rng = np.random.default_rng(batch)
    vocab, canvas_len = ref.config.text_config.vocab_size, ref.config.canvas_length
    for t in _prompt_lengths(ref):
        prompt = rng.integers(0, vocab, (batch, t))
        canvas = rng.integers(0, vocab, (batch, canvas_len))
        sc = 4.0 * rng.standard_normal((batch, canvas_len, vocab)).astype(np.float32)
        for self_cond in (None, sc):
            want = oracle.canvas_logits(ref, prompt, canvas, self_cond)
            got = np.asarray(ours.canvas_logits(prompt, canvas, self_cond))
            assert got.dtype == np.float32 and got.shape == want.shape
            assert np.abs(want).max() > 1.0, "degenerate test: logits too small to tell anything"
            np.testing.assert_allclose(got, want, rtol=0, atol=ATOL, err_msg=f"T={t} sc={self_cond is not None}")


@pytest.mark.parametrize("batch", [1, 2])
def test_encoder_logits_match_transformers(pair, batch):
    ref, ours = pair
    rng = np.random.default_rng(10 + batch)
    for t in _prompt_lengths(ref):
        prompt = rng.integers(0, ref.config.text_config.vocab_size, (batch, t))
        want = oracle.encoder_logits(ref, prompt)
        got = np.asarray(ours.encoder_logits(prompt))
        np.testing.assert_allclose(got, want, rtol=0, atol=ATOL, err_msg=f"T={t}")


def test_self_conditioning_changes_logits(pair):
    """Guards the test above: the self-conditioning input must matter."""
    ref, ours = pair
    rng = np.random.default_rng(0)
    vocab, canvas_len = ref.config.text_config.vocab_size, ref.config.canvas_length
    prompt, canvas = rng.integers(0, vocab, (1, 5)), rng.integers(0, vocab, (1, canvas_len))
    sc = 4.0 * rng.standard_normal((1, canvas_len, vocab)).astype(np.float32)
    diff = np.abs(np.asarray(ours.canvas_logits(prompt, canvas, sc)) - np.asarray(ours.canvas_logits(prompt, canvas)))
    assert diff.max() > 100 * ATOL


@pytest.mark.parametrize("impl", ["ragged", "pallas", "pallas_gpu", "tiled", "bucketed"])
def test_moe_back_ends_match_dense_reference(tmp_path, impl):
    """Each routed back end equals the all-experts reference (and so transformers)."""
    ref = oracle.build(seed=7, num_experts=6, top_k_experts=2)
    path = oracle.save(ref, tmp_path / "ckpt")
    routed = dgemma_jax.from_pretrained(path, dtype="float32", moe_impl=impl)
    dense = dgemma_jax.from_pretrained(path, dtype="float32", moe_impl="dense")
    rng = np.random.default_rng(0)
    prompt, canvas = rng.integers(0, 128, (2, 11)), rng.integers(0, 128, (2, 8))
    want = oracle.canvas_logits(ref, prompt, canvas)
    np.testing.assert_allclose(np.asarray(dense.canvas_logits(prompt, canvas)), want, rtol=0, atol=ATOL)
    np.testing.assert_allclose(np.asarray(routed.canvas_logits(prompt, canvas)), want, rtol=0, atol=ATOL)


@pytest.mark.parametrize("backend", ["pallas", "pallas_gpu"])
@pytest.mark.parametrize("name", ["top1_odd", "five_to_one"])
def test_pallas_back_ends_match_transformers(tmp_path, name, backend):
    """moe_impl and attention_impl both ``pallas`` (the TPU kernels) or both ``pallas_gpu`` (the GPU
    kernels), interpret mode here: encoder and canvas logits equal transformers' (and so the XLA
    path's), with prompts shorter and longer than the sliding window."""
    ref = oracle.build(seed=3, **CONFIGS[name])
    path = oracle.save(ref, tmp_path / "ckpt")
    ours = dgemma_jax.from_pretrained(path, dtype="float32", moe_impl=backend, attention_impl=backend)
    rng = np.random.default_rng(4)
    vocab, canvas_len = ref.config.text_config.vocab_size, ref.config.canvas_length
    for t in _prompt_lengths(ref):
        prompt = rng.integers(0, vocab, (2, t))
        canvas = rng.integers(0, vocab, (2, canvas_len))
        np.testing.assert_allclose(np.asarray(ours.canvas_logits(prompt, canvas)), oracle.canvas_logits(ref, prompt, canvas),
                                   rtol=0, atol=ATOL, err_msg=f"canvas T={t}")
        np.testing.assert_allclose(np.asarray(ours.encoder_logits(prompt)), oracle.encoder_logits(ref, prompt),
                                   rtol=0, atol=ATOL, err_msg=f"encoder T={t}")
