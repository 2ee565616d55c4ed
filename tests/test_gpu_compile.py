"""Compile for an H100 without a GPU (jax's CUDA plugin, ``pip install .[gpu-aot]``, and ptxas on
PATH; skipped without them): the model's canvas step through each GPU MoE back end, as
``dgemma plan --topology h100`` does. What only the compiled program shows: ``pallas_gpu`` runs its
expert FFN as two Triton kernels per layer with no host round trip, where ``bucketed`` picks its
capacity bucket with a ``conditional`` in every layer (and before it, a binary search compiled to a
``while`` loop), and so runs a pass as one CUDA graph where ``bucketed``'s are cut at each
conditional; ``attention_impl=pallas_gpu`` is one Triton kernel per layer in place of XLA's
attention."""

import shutil
from pathlib import Path

import pytest

from dgemma_jax.configs_io import load_model_config
from dgemma_jax.plan import cuda_plugin, plan

pytestmark = pytest.mark.skipif(
    cuda_plugin() is None or shutil.which("ptxas") is None,
    reason="jax's CUDA plugin (pip install .[gpu-aot]) or ptxas not installed")

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "model" / "diffusiongemma_26b_a4b.py"


@pytest.fixture(scope="module")
def two_layers():
    """The 26B config cut to its last two layers (a sliding and a full one): real shapes and tilings."""
    config = load_model_config(CONFIG)
    return config.replace(layer_types=config.layer_types[-2:], attention_impl="xla")


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_pallas_gpu_runs_two_triton_kernels_per_layer_and_no_host_round_trip(two_layers, quantize):
    (row,) = plan(two_layers.replace(moe_impl="pallas_gpu"), {"expert": 1}, topology="h100", batch=1, context=1024,
                  programs=("canvas",), quantize=quantize, progress=lambda line: None)
    assert row.error is None and row.pallas_kernels == 2 * 2  # gate/up and down in each layer
    assert row.hbm_gb == 80 and 0 < row.peak_gb < row.hbm_gb
    assert (row.graphs, row.outside_graphs) == (1, 0)  # the whole pass is one CUDA graph


def test_bucketed_chooses_its_bucket_through_the_host_in_every_layer(two_layers):
    from dgemma_jax import plan as P
    from dgemma_jax.sharding import make_mesh

    config = two_layers.replace(moe_impl="bucketed")
    mesh = make_mesh({"expert": 1}, P.topology_devices("h100"))
    graphdef, state, _ = P._abstract_state(config, "bfloat16", mesh)
    compiled, thunks = P._compile(P._lower_canvas(config, graphdef, state, mesh, 1, 1024, "bfloat16"), gpu=True)
    ops = P.launches(compiled.as_text())
    assert ops.get("conditional") == 2 and not any(t in ops for t in P.PALLAS_TARGETS)
    assert "while" not in ops  # the bucket is found by one compare-and-count, not a binary-search loop
    # each conditional cuts the pass's CUDA graph: before, between and after them, and a branch's own
    assert P.cuda_graphs(thunks) == (2 + 1 + 2, 2)


def test_the_gpu_attention_kernel_replaces_xlas_attention(two_layers):
    """attention_impl=pallas_gpu: one Triton kernel per layer in place of XLA's concatenation, score
    matrix, softmax and transposes."""
    rows = {attention: plan(two_layers.replace(moe_impl="pallas_gpu", attention_impl=attention), {"expert": 1},
                            topology="h100", batch=4, context=1024, programs=("canvas",),
                            progress=lambda line: None)[0] for attention in ("xla", "pallas_gpu")}
    xla, kernel = rows["xla"], rows["pallas_gpu"]
    assert kernel.error is None and kernel.pallas_kernels == 3 * 2  # attention, gate/up, down per layer
    assert kernel.launches <= xla.launches - 2 * 4  # at least 4 launches fewer per layer


def test_plan_compiles_the_serving_programs_with_both_kernels():
    """``plan``'s canvas and loop programs for an H100 with both GPU kernels, on a small config: nothing
    in building them runs on the compile-only device (the default device while they are lowered)."""
    config = load_model_config(CONFIG.parent / "tiny.py").replace(moe_impl="pallas_gpu", attention_impl="pallas_gpu")
    rows = plan(config, {"expert": 1}, topology="h100", batch=2, context=64, programs=("canvas", "loop"),
                progress=lambda line: None)
    assert [(row.program, row.error) for row in rows] == [("canvas", None), ("loop", None)]
    assert all(row.pallas_kernels > 0 for row in rows)
