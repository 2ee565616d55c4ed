"""pallas_kernels.expert_ffn (the GPU expert-FFN kernels, interpret mode here) against a plain XLA
reference: ragged and empty groups, rows no group owns, several tilings, int8 weights with scales,
rows given in place or gathered by a row index, results in row order or stored by an out index; and
the kernels lowered to Triton for a GPU at the 26B layer's shapes, which needs no GPU."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import triton as plgpu

from dgemma_jax import quant
from pallas_kernels.common import lower_for_gpu
from pallas_kernels.expert_ffn import GpuTiling, expert_ffn


def _reference(rows, sizes, gate, up, down):
    """Row r of group g -> gelu_tanh(r @ gate[g]) * (r @ up[g]) @ down[g]; 0 past the last group."""
    ends = jnp.cumsum(sizes)
    group = jnp.searchsorted(ends, jnp.arange(rows.shape[0]), side="right")  # [M]
    g = jnp.clip(group, 0, gate.shape[0] - 1)
    mm = lambda x, w: jnp.einsum("mk,mkn->mn", x, w[g], precision="highest")  # noqa: E731
    out = mm(jax.nn.gelu(mm(rows, gate), approximate=True) * mm(rows, up), down)
    return jnp.where((group < gate.shape[0])[:, None], out, 0)


def _weights(rng, experts, hidden, width):
    gate, up = (jnp.asarray(rng.standard_normal((experts, hidden, width)) / hidden**0.5, jnp.float32) for _ in "gu")
    down = jnp.asarray(rng.standard_normal((experts, width, hidden)) / width**0.5, jnp.float32)
    return gate, up, down


CASES = [  # (M, H, I, group sizes, tiling)
    (40, 24, 10, [10, 0, 25, 3], GpuTiling()),  # H and I padded to 16s, default rows per visit
    (64, 64, 32, [8] * 8, GpuTiling(bm=16)),  # exact blocks, one visit per expert
    (100, 48, 40, [30, 0, 0, 40, 10], GpuTiling(bm=32)),  # 20 rows after the last group come out zero
    (7, 16, 16, [0, 7, 0], GpuTiling()),  # one group, fewer rows than a visit
    (300, 160, 96, [130, 1, 0, 169], GpuTiling(bm=64, bn=32, bk=32, bn_down=32, bk_down=32)),  # many visits, k, n steps
    (300, 160, 96, [130, 1, 0, 169], GpuTiling(bm=32, bn=32, bk=32, visits_inner=True)),  # the other grid order
    (20, 32, 32, [0, 0], GpuTiling(bm=16)),  # no local rows at all (another shard's tokens)
]


def _rows(rng, m, hidden, mode):
    """-> (x, row_index, out_index, the rows x[row_index]): m rows given as they are ("in-place"),
    gathered from fewer distinct ones ("gathered", as the MoE layer's top-k repeats each token), or
    gathered and stored in a shuffled order ("scattered", out_index a permutation)."""
    if mode == "in-place":
        rows = jnp.asarray(rng.standard_normal((m, hidden)), jnp.float32)
        return rows, None, None, rows
    x = jnp.asarray(rng.standard_normal((max(1, m // 3), hidden)), jnp.float32)
    index = jnp.asarray(rng.integers(0, x.shape[0], m), jnp.int32)
    out_index = jnp.asarray(rng.permutation(m), jnp.int32) if mode == "scattered" else None
    return x, index, out_index, x[index]


def _sorted(out, out_index, sizes):
    """The result in sorted-row order; with out_index, the rows no group owns (never written) as 0."""
    if out_index is None:
        return out
    owned = (jnp.arange(out.shape[0]) < jnp.sum(sizes))[:, None]
    return jnp.where(owned, out[out_index], 0)


MODES = ["in-place", "gathered", "scattered"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("m,hidden,width,sizes,tiling", CASES)
def test_float_weights_match_xla(m, hidden, width, sizes, tiling, mode):
    rng = np.random.default_rng(m + hidden)
    x, index, out_index, rows = _rows(rng, m, hidden, mode)
    gate, up, down = _weights(rng, len(sizes), hidden, width)
    sizes = jnp.asarray(sizes, jnp.int32)
    out = expert_ffn(x, sizes, gate, up, down, row_index=index, out_index=out_index, tiling=tiling)
    assert out.shape == (m, hidden) and out.dtype == jnp.float32
    out = _sorted(out, out_index, sizes)
    want = _reference(rows, sizes, gate, up, down)
    # float32 throughout: only the summation order differs from the reference
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max() + 1))


@pytest.mark.parametrize("mode", MODES)
def test_int8_weights_match_the_dequantized_float_ones(mode):
    rng = np.random.default_rng(1)
    x, index, out_index, rows = _rows(rng, 90, 48, mode)
    weights = _weights(rng, 3, 48, 40)
    (gate, gs), (up, us), (down, ds) = (quant.quantize_int8(w, 1) for w in weights)
    sizes = jnp.asarray([41, 0, 45], jnp.int32)
    run = jax.jit(lambda x, i, o: expert_ffn(x, sizes, gate, up, down, gs, us, ds, row_index=i, out_index=o,
                                             tiling=GpuTiling(bm=16)))
    out = _sorted(run(x, index, out_index), out_index, sizes)
    want = _reference(rows, sizes, *(quant.dequantize(q, s, 1) for q, s in ((gate, gs), (up, us), (down, ds))))
    # the scale multiplies the float32 accumulator instead of the weights: rounding-order differences
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max() + 1))


def test_bad_inputs_name_what_is_wrong():
    rows, sizes = jnp.zeros((8, 16)), jnp.asarray([8, 0])
    gate = up = jnp.zeros((2, 16, 16))
    with pytest.raises(ValueError, match=r"down \(2, 16, 32\)"):
        expert_ffn(rows, sizes, gate, up, jnp.zeros((2, 16, 32)))
    with pytest.raises(ValueError, match=r"group_sizes \(3,\) for 2 experts"):
        expert_ffn(rows, jnp.asarray([8, 0, 0]), gate, up, gate)
    with pytest.raises(ValueError, match="all three scales"):
        expert_ffn(rows, sizes, gate, up, gate, jnp.ones((2, 16)))
    with pytest.raises(ValueError, match=r"row_index \(8, 1\) int32"):
        expert_ffn(rows, sizes, gate, up, gate, row_index=jnp.zeros((8, 1), jnp.int32))
    with pytest.raises(ValueError, match=r"row_index \(8,\) float32"):
        expert_ffn(rows, sizes, gate, up, gate, row_index=jnp.zeros((8,)))
    with pytest.raises(ValueError, match=r"out_index \(7,\) for 8 rows"):
        expert_ffn(rows, sizes, gate, up, gate, out_index=jnp.zeros((7,), jnp.int32))


@pytest.mark.parametrize("weights", ["bfloat16", "int8"])
@pytest.mark.parametrize("canvases", [1, 16])
def test_lowers_to_triton_at_the_26b_shapes(weights, canvases):
    """Both kernels lower to Triton IR for a CUDA GPU (block shapes, loads and ops are Triton's),
    with the grid the docstring promises, (column blocks, visits), and launch settings that fit:
    one canvas (2,048 rows, top-8) gives 16-row visits, 2,048 // 16 + 128 of them; sixteen give
    128-row visits, 8 warps for gate/up's two 128 x 64 accumulators and down's 128 x 128, and gate/up's
    3 pipeline stages of 64 KiB (bf16) within the shared memory. The rows are gathered from the
    tokens by a row index and stored in (token, expert) order, as the MoE layer calls it."""
    s = jax.ShapeDtypeStruct
    e, hidden, width, n = 128, 2816, 704, canvases * 256
    m = n * 8
    args = [s((n, hidden), jnp.bfloat16), s((m,), jnp.int32), s((m,), jnp.int32), s((e,), jnp.int32),
            s((e, hidden, width), weights), s((e, hidden, width), weights), s((e, width, hidden), weights)]
    if weights == "int8":
        args += [s((e, width), jnp.float32), s((e, width), jnp.float32), s((e, hidden), jnp.float32)]
    tiling = GpuTiling(interpret=False)
    run = jax.jit(lambda x, index, order, *a: expert_ffn(x, *a, row_index=index, out_index=order, tiling=tiling))
    text = lower_for_gpu(run, *args).as_text()
    calls = [line for line in text.splitlines() if "xla.gpu.triton" in line]
    keys = ("grid_x", "grid_y", "num_warps", "num_stages")
    found = [tuple(int(re.search(f"{key} = (\\d+)", line).group(1)) for key in keys) for line in calls]
    visits = m // (16 if canvases == 1 else 128) + e
    assert found == ([(11, visits, 4, 3), (22, visits, 4, 3)] if canvases == 1 else
                     [(11, visits, 8, 3), (22, visits, 8, 3)])


def test_launch_settings_fit_the_shared_memory():
    assert GpuTiling().compiler_params(2 * 16 * 64, 36 * 1024) == plgpu.CompilerParams(num_warps=4, num_stages=3)
    assert GpuTiling(num_warps=2).compiler_params(128 * 128, 36 * 1024).num_warps == 2
    assert GpuTiling(num_stages=4).compiler_params(1, 64 * 1024).num_stages == 3  # 4 x 64 KiB do not fit
    assert GpuTiling().compiler_params(1, 1 << 20).num_stages == 1
