"""Compile for a real TPU v5e topology without a TPU (libtpu from ``jax[tpu]``; skipped without it):
both Pallas kernels (Mosaic, forward and gradient, inside shard_map) and the 26B canvas step with
both kernels, experts over 8 chips. See docs/scaling.md for the full plan (``dgemma plan``)."""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu (jax[tpu]) not installed")

TOPOLOGY = "v5e:2x4"


@pytest.fixture(scope="module")
def mesh():
    from dgemma_jax.plan import topology_devices
    from dgemma_jax.sharding import make_mesh

    return make_mesh({"expert": 8}, topology_devices(TOPOLOGY))


def _compile_with_grad(fn, *args):
    """Compiles fn and the gradient of its sum w.r.t. the float arguments; returns the HLO texts."""
    floats = tuple(i for i, a in enumerate(args) if jnp.issubdtype(a.dtype, jnp.floating))
    grad = jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32)), floats)
    return [jax.jit(f).lower(*args).compile().as_text() for f in (fn, grad)]


def test_grouped_matmul_compiles_for_v5e(mesh):
    from pallas_kernels.grouped_matmul import Tiling, grouped_matmul

    tiling = Tiling(tm=128, tk=256, tn=256, interpret=False)

    def experts(lhs, rhs, sizes):
        def local(lhs, rhs, sizes):
            offset = jax.lax.axis_index("expert") * rhs.shape[0]
            return jax.lax.psum(grouped_matmul(lhs, rhs, sizes, offset, tiling), "expert")

        return jax.shard_map(local, mesh=mesh, in_specs=(P(), P("expert"), P()), out_specs=P(), check_vma=False)(
            lhs, rhs, sizes)

    rep, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("expert"))
    args = (jax.ShapeDtypeStruct((1024, 512), jnp.bfloat16, sharding=rep),
            jax.ShapeDtypeStruct((16, 512, 256), jnp.bfloat16, sharding=split),
            jax.ShapeDtypeStruct((16,), jnp.int32, sharding=rep))
    for hlo in _compile_with_grad(experts, *args):
        assert "tpu_custom_call" in hlo  # the Mosaic kernel, not an XLA fallback


@pytest.mark.parametrize("kind,window", [("causal", 1024), ("canvas", 1024), ("canvas", None)])
def test_flash_attention_compiles_for_v5e(mesh, kind, window):
    from pallas_kernels.attention import Blocks, flash_attention

    b, t, s, n, k, d = 8, 256, 1024, 16, 8, 256
    cache = s - t if kind == "canvas" else 0

    def attention(q, keys, values, offsets):
        local = lambda *a: flash_attention(*a, kind=kind, window=window, cache_size=cache,  # noqa: E731
                                           blocks=Blocks(128, 128, interpret=False))
        return jax.shard_map(local, mesh=mesh, in_specs=(P("expert"),) * 4, out_specs=P("expert"),
                             check_vma=False)(q, keys, values, offsets)

    sh = NamedSharding(mesh, P("expert"))
    args = (jax.ShapeDtypeStruct((b, t, n, d), jnp.bfloat16, sharding=sh),
            jax.ShapeDtypeStruct((b, s, k, d), jnp.bfloat16, sharding=sh),
            jax.ShapeDtypeStruct((b, s, k, d), jnp.bfloat16, sharding=sh),
            jax.ShapeDtypeStruct((b,), jnp.int32, sharding=sh))
    for hlo in _compile_with_grad(attention, *args):
        assert "tpu_custom_call" in hlo


def test_26b_canvas_step_compiles_for_v5e_2x4_and_fits():
    """The serving layout of docs/scaling.md: experts over 8 chips, the rest replicated, both kernels."""
    from dgemma_jax.configs_io import load_model_config
    from dgemma_jax.plan import plan

    config = load_model_config(Path(__file__).resolve().parents[1] / "configs/model/diffusiongemma_26b_a4b.py").replace(moe_impl="pallas",
                                                                                 attention_impl="pallas")
    (row,) = plan(config, {"expert": 8}, topology=TOPOLOGY, batch=1, context=4096, programs=("canvas",),
                  progress=lambda line: None)
    assert row.hbm_gb == 16 and row.peak_gb < row.hbm_gb
    assert row.argument_gb > 0.6 * 52 / 8  # at least the experts' share of 52 GB of bf16 weights per chip
