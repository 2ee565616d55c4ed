"""Weight-only int8 experts (``dgemma_jax.quant``): the quantiser's rounding bound, every MoE back end
applying the scales, and the quantised model equal to transformers running the dequantised weights.

Tolerances: float32 throughout; a quantised product differs from the dequantised-weights product
only in where the per-channel scale is multiplied (after the sum instead of inside it), i.e. by
float32 rounding, so layer outputs agree to 1e-5 and logits to the parity tests' 1e-4."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dgemma_jax
from dgemma_jax import moe as moe_lib
from dgemma_jax import quant
from dgemma_jax.config import ModelConfig
from tests import oracle

ATOL = 1e-4


def test_quantize_int8_rounding_bound():
    w = jax.random.normal(jax.random.key(0), (3, 40, 24)) * jnp.arange(1, 25)  # channels of varied range
    w = w.at[:, :, 5].set(0.0)  # an all-zero output channel
    q, scale = quant.quantize_int8(w, 1)
    assert q.dtype == jnp.int8 and q.shape == w.shape and scale.shape == (3, 24)
    assert int(jnp.max(jnp.abs(q.astype(jnp.int32)))) == 127
    err = jnp.abs(quant.dequantize(q, scale, 1) - w)
    assert bool(jnp.all(err <= scale[:, None, :] / 2 + 1e-6))
    assert bool(jnp.all(q[:, :, 5] == 0)) and bool(jnp.all(scale[:, 5] == 1.0))


def _layer(impl):
    cfg = ModelConfig(vocab_size=16, hidden_size=24, intermediate_size=8, num_experts=8, num_experts_per_tok=2,
                      moe_intermediate_size=10, moe_impl=impl)
    return moe_lib.MoE(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32)


@pytest.mark.parametrize("impl", ["ragged", "pallas", "pallas_gpu", "tiled", "bucketed", "dense"])
def test_back_ends_apply_the_scales(impl):
    """A quantised layer equals the float layer holding the dequantised weights."""
    layer = _layer(impl)
    quant.quantize(layer)
    assert layer.gate[...].dtype == jnp.int8 and layer.down_scale[...].shape == (8, 24)
    ref = _layer("dense")
    for name in ("gate", "up", "down"):
        getattr(ref, name)[...] = quant.dequantize(getattr(layer, name)[...], getattr(layer, f"{name}_scale")[...], 1)
    x = jax.random.normal(jax.random.key(1), (2, 9, 24))
    np.testing.assert_allclose(np.asarray(layer(x, x)), np.asarray(ref(x, x)), rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    ref = oracle.build(seed=5, num_experts=6, top_k_experts=2)
    return ref, oracle.save(ref, tmp_path_factory.mktemp("hf"))


def test_quantized_model_equals_transformers_on_dequantized_weights(hf, tmp_path):
    ref, path = hf
    int8 = dgemma_jax.from_pretrained(path, dtype="float32", quantize="int8")
    assert quant.is_quantized(int8.module)
    with pytest.raises(ValueError, match="quantised"):
        int8.save_pretrained(tmp_path / "nope")
    assert not (tmp_path / "nope").exists()
    # the float model with the int8 values * scales written into its experts, run by transformers
    dequant = dgemma_jax.from_pretrained(path, dtype="float32")
    for ours, theirs in zip(int8.module.layers, dequant.module.layers):
        for name in ("gate", "up", "down"):
            getattr(theirs.moe, name)[...] = quant.dequantize(getattr(ours.moe, name)[...],
                                                             getattr(ours.moe, f"{name}_scale")[...], 1)
    oracle_dequant, _ = oracle.load(dequant.save_pretrained(tmp_path / "dequantized"))
    rng = np.random.default_rng(0)
    prompt, canvas = rng.integers(0, 128, (2, 11)), rng.integers(0, 128, (2, 8))
    want = oracle.canvas_logits(oracle_dequant, prompt, canvas)
    got = np.asarray(int8.canvas_logits(prompt, canvas))
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
    # and quantisation did change the model: the float logits are measurably elsewhere
    assert np.abs(oracle.canvas_logits(ref, prompt, canvas) - want).max() > 10 * ATOL


def test_bad_mode_is_named(hf):
    with pytest.raises(ValueError, match="quantize='int4'"):
        dgemma_jax.from_pretrained(hf[1], quantize="int4")
