"""The MoE back ends on their own: routing edge cases that the model-level tests may not hit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dgemma_jax.config import ModelConfig
from dgemma_jax import moe as moe_lib
from dgemma_jax.moe import MoE


def _moe(impl, experts=8, top_k=2):
    cfg = ModelConfig(vocab_size=16, hidden_size=24, intermediate_size=8, num_experts=experts,
                      num_experts_per_tok=top_k, moe_intermediate_size=10, moe_impl=impl)
    return MoE(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32)


@pytest.mark.parametrize("impl", ["ragged", "pallas", "pallas_gpu", "tiled", "bucketed"])
@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_routed_equals_dense(impl, tokens):
    x = jax.random.normal(jax.random.key(tokens), (tokens, 24))
    dense, routed = _moe("dense"), _moe(impl)
    np.testing.assert_allclose(np.asarray(routed(x, x)), np.asarray(dense(x, x)), rtol=0, atol=1e-5)


@pytest.mark.parametrize("impl", ["ragged", "pallas", "pallas_gpu", "tiled", "bucketed"])
def test_all_tokens_on_one_expert(impl):
    """Empty groups everywhere but one, and a group larger than a tile."""
    dense, routed = _moe("dense", top_k=1), _moe(impl, top_k=1)
    bias = jnp.zeros((24, 8)).at[:, 3].set(50.0)  # router strongly prefers expert 3
    for m in (dense, routed):
        m.router_proj[...] = m.router_proj[...] + bias
    x = jnp.abs(jax.random.normal(jax.random.key(0), (40, 24)))
    assert (np.asarray(routed.route(x)[1]) == 3).all()
    np.testing.assert_allclose(np.asarray(routed(x, x)), np.asarray(dense(x, x)), rtol=0, atol=1e-5)


@pytest.mark.parametrize("impl", ["ragged", "pallas", "pallas_gpu", "tiled", "bucketed", "dense"])
def test_expert_shards_add_up_to_the_whole(impl):
    """What each device of an ``expert`` mesh computes: the share of its experts (offset, local
    weights); assignments to other shards' experts contribute exactly zero. The shares sum to the
    one-device result."""
    m = _moe("dense")
    x = jax.random.normal(jax.random.key(3), (2, 9, 24))
    params = [m.router_proj[...], m.router_scale[...], m.per_expert_scale[...]]
    experts = [m.gate[...], m.up[...], m.down[...]]
    whole = moe_lib._moe("dense", 2, 1e-6, 0, x, x, *params, moe_lib.ExpertWeights(*experts))
    shares = [moe_lib._moe(impl, 2, 1e-6, off, x, x, *params, moe_lib.ExpertWeights(*(w[off:off + 2] for w in experts)))
              for off in (0, 2, 4, 6)]
    np.testing.assert_allclose(np.asarray(sum(shares)), np.asarray(whole), rtol=0, atol=1e-5)
    assert all(float(jnp.abs(share).max()) > 0 for share in shares)


@pytest.mark.parametrize("tokens", [3, 40])
def test_bucketed_gradients_equal_dense(tokens):
    """The capacity-bucketed back end is differentiable (lax.switch over capacities): its input and
    weight gradients equal the dense reference's."""
    x = jax.random.normal(jax.random.key(tokens), (tokens, 24))
    m = _moe("dense")
    params = [m.router_proj[...], m.router_scale[...], m.per_expert_scale[...]]

    def grads(impl):
        def loss(x, gate, down):
            w = moe_lib.ExpertWeights(gate, m.up[...], down)
            return jnp.sum(jnp.sin(moe_lib._moe(impl, 2, 1e-6, 0, x, x, *params, w)))
        return jax.grad(loss, argnums=(0, 1, 2))(x, m.gate[...], m.down[...])

    for got, want in zip(grads("bucketed"), grads("dense")):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_auto_picks_the_measured_back_end_per_platform():
    """``auto`` follows bench/moe.py: bucketed won on an H100 at 256, 1,024 and 4,096 tokens (bf16
    and int8); the Mosaic kernel on TPU; tiled on CPU. Training swaps CPU for dense (gradient)."""
    from dgemma_jax.training.trainer import training_moe_impl

    assert [moe_lib.resolve_impl("auto", p) for p in ("gpu", "tpu", "cpu")] == ["bucketed", "pallas", "tiled"]
    assert [training_moe_impl("auto", p) for p in ("gpu", "tpu", "cpu")] == ["bucketed", "pallas", "dense"]
    assert moe_lib.resolve_impl("ragged", "gpu") == "ragged"


@pytest.mark.parametrize("impl", ["tiled", "pallas_gpu"])
def test_training_refuses_forward_only_back_ends(impl):
    from dgemma_jax.training.trainer import TrainError, training_moe_impl

    with pytest.raises(TrainError, match=f"moe_impl='{impl}' has no gradient"):
        training_moe_impl(impl, "gpu")


def test_training_refuses_the_gpu_attention_kernel():
    from dgemma_jax.training.trainer import TrainError, training_attention_impl

    assert [training_attention_impl(impl) for impl in ("xla", "pallas")] == ["xla", "pallas"]
    with pytest.raises(TrainError, match="attention_impl='pallas_gpu' has no gradient"):
        training_attention_impl("pallas_gpu")
