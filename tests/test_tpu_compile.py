"""Compile for a real TPU v5e topology without a TPU (libtpu from ``jax[tpu]``; skipped without it):
both Pallas kernels (Mosaic, forward and gradient, inside shard_map), the 26B canvas step and one
full layer's train step with both kernels, experts over 8 chips. See docs/scaling.md for the full
plan (``dgemma plan``)."""

import importlib.util
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
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


@pytest.mark.parametrize("k,n", [(2816, 704), (704, 2816)])  # the 26B layer's gate/up and down
def test_grouped_matmul_compiles_for_v5e(mesh, k, n):
    """The default tiling at the 26B expert shapes (blocks that divide them, a few MB of VMEM), with
    the gradient kernels, 128 experts over 8 chips."""
    from pallas_kernels.grouped_matmul import Tiling, grouped_matmul

    tiling = Tiling(interpret=False)

    def experts(lhs, rhs, sizes):
        def local(lhs, rhs, sizes):
            offset = jax.lax.axis_index("expert") * rhs.shape[0]
            return jax.lax.psum(grouped_matmul(lhs, rhs, sizes, offset, tiling), "expert")

        return jax.shard_map(local, mesh=mesh, in_specs=(P(), P("expert"), P()), out_specs=P(), check_vma=False)(
            lhs, rhs, sizes)

    rep, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("expert"))
    args = (jax.ShapeDtypeStruct((2048, k), jnp.bfloat16, sharding=rep),
            jax.ShapeDtypeStruct((128, k, n), jnp.bfloat16, sharding=split),
            jax.ShapeDtypeStruct((128,), jnp.int32, sharding=rep))
    for hlo in _compile_with_grad(experts, *args):
        assert "tpu_custom_call" in hlo  # the Mosaic kernel, not an XLA fallback
        assert "jit(_pad)" not in hlo  # jnp.pad of the weights or rows: they are taken as they are


@pytest.mark.parametrize("kind,window,k,d", [("causal", 1024, 8, 256), ("causal", None, 2, 512),
                                              ("canvas", 1024, 8, 256), ("canvas", None, 2, 512)])
def test_flash_attention_compiles_for_v5e(mesh, kind, window, k, d):
    """The 26B sliding and full layers' heads (a program holds the 2 or 8 query heads of a key/value
    head, up to 1,024 rows x 512), forward and gradient kernels; the canvas pass with the cache and
    the canvas keys as two inputs."""
    from pallas_kernels.attention import Blocks, flash_attention

    b, t, s, n = 8, 256, 1024, 16
    blocks = Blocks(interpret=False)  # each pass's default blocks (the encoder's take 32 MiB of VMEM on full layers)

    def attention(q, keys, values, offsets, *canvas):
        local = lambda q, keys, values, offsets, *canvas: flash_attention(  # noqa: E731
            q, keys, values, offsets, kind=kind, window=window, canvas=canvas or None, blocks=blocks)
        return jax.shard_map(local, mesh=mesh, in_specs=(P("expert"),) * (4 + len(canvas)), out_specs=P("expert"),
                             check_vma=False)(q, keys, values, offsets, *canvas)

    sh = NamedSharding(mesh, P("expert"))
    keys = jax.ShapeDtypeStruct((b, k, s, d), jnp.bfloat16, sharding=sh)
    args = (jax.ShapeDtypeStruct((b, t, n, d), jnp.bfloat16, sharding=sh), keys, keys,
            jax.ShapeDtypeStruct((b,), jnp.int32, sharding=sh))
    if kind == "canvas":
        args += (jax.ShapeDtypeStruct((b, k, t, d), jnp.bfloat16, sharding=sh),) * 2
    for hlo in _compile_with_grad(attention, *args):
        assert "tpu_custom_call" in hlo
        # the canvas keys are read where they are, also by the backward (XLA writes a concatenation as
        # dynamic-update-slices into one buffer; their metadata still names it)
        assert "concatenate" not in hlo


def test_26b_canvas_step_compiles_for_v5e_2x4_and_fits():
    """The serving layout of docs/scaling.md: experts over 8 chips, the rest replicated, both kernels
    compiled by Mosaic although this process's default backend is the CPU (the kernels' interpret
    mode follows the platform the program is lowered for)."""
    from dgemma_jax.configs_io import load_model_config
    from dgemma_jax.plan import plan

    config = load_model_config(Path(__file__).resolve().parents[1] / "configs/model/diffusiongemma_26b_a4b.py")
    config = config.replace(moe_impl="pallas", attention_impl="pallas")
    (row,) = plan(config, {"expert": 8}, topology=TOPOLOGY, batch=1, context=4096, programs=("canvas",),
                  progress=lambda line: None)
    assert row.hbm_gb == 16 and row.peak_gb < row.hbm_gb
    assert row.argument_gb > 0.6 * 52 / 8  # at least the experts' share of 52 GB of bf16 weights per chip
    assert row.pallas_kernels == 4 * len(config.layer_types)  # per layer: attention; gate, up and down


def test_loop_with_weights_in_xla_layouts_needs_no_second_copy_of_them():
    """The denoising loop converts weights left in the default layout before it starts and holds
    both copies (docs/scaling.md); with the weights placed in the layouts XLA picks (what
    ``dgemma_jax.layouts.place_weights`` does) a plain jit of the loop takes them as they are.
    One 26B layer (experts over 8 chips) shows it."""
    from dgemma_jax import plan as P
    from dgemma_jax.configs_io import load_model_config

    config = load_model_config(Path(__file__).resolve().parents[1] / "configs/model/diffusiongemma_26b_a4b.py")
    config = config.replace(layer_types=config.layer_types[-1:], moe_impl="pallas", attention_impl="pallas")
    mesh = P.make_mesh({"expert": 8}, P.topology_devices(TOPOLOGY))
    graphdef, state, _ = P._abstract_state(config, "bfloat16", mesh)

    def compiled(weights, weight_layouts):
        return P._lower_loop(config, graphdef, weights, mesh, 1, 4096, "bfloat16", 16, weight_layouts).compile()

    chosen = compiled(state, "xla")
    formats = chosen.input_formats[0][0]
    assert any(f.layout.tiling for f in jax.tree.leaves(formats))  # TPU tiles them
    placed = jax.tree.map(lambda x, f: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=f), state, formats)
    temp = {name: c.memory_analysis().temp_size_in_bytes
            for name, c in (("default", compiled(state, "default")), ("xla", chosen),
                            ("placed", compiled(placed, "default")))}
    assert temp["placed"] == temp["xla"]
    layer_weights = sum(x.dtype.itemsize * int(np.prod(x.sharding.shard_shape(x.shape)))
                        for path, x in jax.tree.leaves_with_path(state) if "layers" in jax.tree_util.keystr(path))
    assert temp["default"] - temp["xla"] > 0.5 * layer_weights  # the copy a while loop would hold


def test_26b_train_step_full_layer_compiles_for_v5e_2x4(monkeypatch):
    """The train step (LoRA, remat, both kernels and their gradients) of the 26B's last layer, a full
    one (8 query heads of 512 per key/value head: the kernels' largest VMEM blocks), at context 2,048
    on the serving layout: each pass's kernels fit their scoped VMEM inside the step, not only on
    their own (the canvas pass's did not with Mosaic's default 16 MiB; the whole 30 layers take about
    10 minutes to compile here, too long for CI). The frozen weights are in the layouts XLA picks, as ``Trainer``
    places them on TPU: then the step holds no copy of the experts' gate/up weights (with the default
    layouts it copied them at every use and kept the copies: 36 of them at 4,096 tokens)."""
    from dgemma_jax import plan as P
    from dgemma_jax.configs_io import load_model_config

    config = load_model_config(Path(__file__).resolve().parents[1] / "configs/model/diffusiongemma_26b_a4b.py")
    config = config.replace(layer_types=config.layer_types[-1:], moe_impl="pallas", attention_impl="pallas")
    hlo, compile_only = [], P._compile

    def compile_and_keep(lowered, gpu):
        compiled, thunks = compile_only(lowered, gpu)
        hlo.append(compiled.as_text())
        return compiled, thunks

    monkeypatch.setattr(P, "_compile", compile_and_keep)
    (row,) = P.plan(config, {"expert": 8}, topology=TOPOLOGY, batch=1, context=2048, programs=("train",),
                    progress=lambda line: None)
    assert row.error is None, row.error
    assert 0 < row.peak_gb < row.hbm_gb
    assert row.pallas_kernels >= 2 * 4  # attention, gate, up, down: forward and gradient kernels
    gate = f"bf16[16,{config.hidden_size},{config.moe_intermediate_size}]"  # one chip's 16 experts
    assert re.findall(rf"= {re.escape(gate)}\S* copy\(", hlo[0]) == []
