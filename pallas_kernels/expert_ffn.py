"""A MoE layer's whole expert FFN as two Pallas kernels for GPU (Triton); ``interpret=True`` elsewhere.

The rows [M, H] are sorted by expert: expert ``g`` owns the rows ``[start_g, start_g + size_g)``,
``start = cumsum(sizes) - sizes``. They are either the input itself or gathered from it by a row
index (``row_index``: the MoE layer's token of each (token, expert) assignment), which the gate/up
kernel reads row by row, so the sorted copy of the tokens is never written. For each expert, over
its rows only,

    gelu_tanh(rows @ gate[g]) * (rows @ up[g]) @ down[g]

Rows after the last group come out as zero (on an ``expert`` mesh they are other shards' work).
Weights are float, or int8 with per-output-channel float32 scales (``dgemma_jax.quant``): the int8
tiles are read as int8 and converted in registers, the scale applied to the float32 accumulator.

Why two kernels instead of XLA's batched einsums (``moe_impl="bucketed"``): each expert's weights
are read once per row tile its rows fill, with no capacity padding and no run-time choice of
program, and the gate and up products share one pass over the rows with the GELU product fused
into their epilogue.

The kernels walk *visits*: (expert, first row, end row) tiles of at most ``bm`` rows of one expert
each, in row order. Their number has a static bound (``M // bm + E``); visits past the real count
return at once. Each program works out its own visit from the group sizes (a cumulative sum over
the experts), so the layer launches no kernels to build a visit list. Grid: (output column block,
visit), column blocks fastest: side-by-side programs read whole rows of one expert's weight matrix
and share their row tile through L2, and the visits of one expert run close together
(``GpuTiling.visits_inner`` swaps the order).

Forward only (serving); training on GPU uses ``moe_impl="bucketed"``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import pad_to, pallas_call, round_up


@dataclasses.dataclass(frozen=True)
class GpuTiling:
    """Block sizes (powers of two, at least 16: Triton's dot) and Triton launch settings.

    ``bm``: rows per visit; None = the average group size rounded up to a power of two, 16..128.
    ``bn``, ``bk``: output columns and contracted dim per step of the gate/up kernel (over H);
    ``bn_down``, ``bk_down``: the same for the down kernel (over the expert width I). A block larger
    than a dim's largest power-of-two divisor is lowered to it; a dim with no such divisor of at
    least 16 is zero-padded (only small test shapes). ``num_warps``: None = 8 for accumulators of
    128 x 128 or more float32s (gate and up together), else 4. ``num_stages``: loads in flight per
    loop, lowered where the tiles of that many steps would not fit ``SHARED_MEMORY`` (an H100 has
    227 KiB per block). ``visits_inner``: launch the grid visits fastest instead of column blocks
    fastest. ``interpret``: None = the Triton kernels where the program is lowered for an NVIDIA
    GPU, interpreted elsewhere."""

    bm: int | None = None
    bn: int = 64
    bk: int = 128
    bn_down: int = 128
    bk_down: int = 64
    num_warps: int | None = None
    num_stages: int = 3
    visits_inner: bool = False
    interpret: bool | None = None

    def rows_per_visit(self, rows: int, groups: int) -> int:
        if self.bm is not None:
            return self.bm
        return int(min(128, max(16, pl.next_power_of_2(max(1, -(-rows // groups))))))

    def compiler_params(self, accumulator: int, stage_bytes: int) -> plgpu.CompilerParams:
        """Triton's launch settings for a kernel with ``accumulator`` float32s per program whose loop
        loads ``stage_bytes`` per step."""
        warps = self.num_warps or (8 if accumulator >= 128 * 128 else 4)
        stages = max(1, min(self.num_stages, SHARED_MEMORY // stage_bytes))
        return plgpu.CompilerParams(num_warps=warps, num_stages=stages)


SHARED_MEMORY = 200 * 1024  # bytes of pipelined tiles per program: an H100 block has 227 KiB, less Triton's own


def _block(requested: int, dim: int) -> tuple[int, int]:
    """-> (block, padded dim): the largest power of two <= ``requested`` dividing ``dim`` (at least
    16), or 16 with ``dim`` padded up to a multiple of 16."""
    block = requested
    while block > 16 and dim % block:
        block //= 2
    return block, round_up(dim, block)


def _visit(sizes: jax.Array, v: jax.Array, bm: int):
    """sizes [E'] int32 (zero-padded to a power of two, Triton's block shapes), v: a visit -> its expert,
    first row, end row, and the number of real visits. Every program derives its own visit from the
    group sizes, so no kernel before the two builds a visit list."""
    tiles = jax.lax.div(sizes + (bm - 1), bm)  # [E'] visits per expert
    last = jax.lax.cumsum(tiles, axis=0)  # [E'] one past each expert's last visit
    ends = jax.lax.cumsum(sizes, axis=0)  # [E'] one past each expert's last row
    expert = jnp.sum((last <= v).astype(jnp.int32))  # experts that end at or before v; E' for v past the count
    mine = jax.lax.broadcasted_iota(jnp.int32, sizes.shape, 0) == expert
    pick = lambda a: jnp.sum(jnp.where(mine, a, 0))  # noqa: E731  a[expert]
    first = pick(ends - sizes) + (v - pick(last - tiles)) * bm
    return expert, first, jnp.minimum(first + bm, pick(ends)), jnp.sum(tiles)


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """a @ b.astype(a.dtype), float32 accumulation; float32 operands in full precision (Triton's
    default for them is TF32), bf16 ones as they are."""
    return jnp.dot(a, b.astype(a.dtype), preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST)


def _visit_and_block(visits_inner: bool):
    """-> (visit, column block) of this program."""
    first, second = pl.program_id(0), pl.program_id(1)
    return (first, second) if visits_inner else (second, first)


def _gelu_product(gate: jax.Array, up: jax.Array) -> jax.Array:
    return jax.nn.gelu(gate, approximate=True) * up


def _expert_kernel(sizes_ref, *refs, gathered: bool, scattered: bool, num_weights: int, epilogue, bm: int, bn: int,
                   bk: int, k_steps: int, visits_inner: bool):
    """One (visit, column block): out[rows, cols] = epilogue(x[rows] @ w[e][:, cols] (x scale) for
    each of the ``num_weights`` weights), rows the visit's, e its expert. refs: the gather index (when
    ``gathered``: the visit's rows are x[gather[rows]]), the scatter index (when ``scattered``: they
    are stored at out[scatter[rows]]), x, the weights, their scales (int8 only), the output."""
    gather_ref, refs = (refs[0], refs[1:]) if gathered else (None, refs)
    scatter_ref, refs = (refs[0], refs[1:]) if scattered else (None, refs)
    x_ref, weight_refs, scale_refs, out_ref = refs[0], refs[1:num_weights + 1], refs[num_weights + 1:-1], refs[-1]
    v, j = _visit_and_block(visits_inner)
    e, first, end, num = _visit(sizes_ref[...], v, bm)

    @pl.when(v < num)
    def _():
        cols = pl.ds(pl.multiple_of(j * bn, bn), bn)

        def window(index_ref, past_end: int):  # the visit's [bm] rows, or their entries in an index
            if index_ref is None:
                return pl.ds(first, bm)
            mine = first + jax.lax.broadcasted_iota(jnp.int32, (bm,), 0) < end
            return plgpu.load(index_ref.at[pl.ds(first, bm)], mask=mine, other=past_end)

        rows = window(gather_ref, 0)  # rows past ``end`` read row 0, computed and not stored

        def step(i, acc):
            ks = pl.ds(pl.multiple_of(i * bk, bk), bk)
            x = x_ref[rows, ks]  # [bm, bk]; rows past ``end`` are computed, not stored
            return tuple(a + _dot(x, w[e, ks, cols]) for a, w in zip(acc, weight_refs))

        acc = jax.lax.fori_loop(0, k_steps, step, (jnp.zeros((bm, bn), jnp.float32),) * num_weights)  # [bm, bn]
        if scale_refs:
            acc = tuple(a * scale[e, cols][None, :] for a, scale in zip(acc, scale_refs))
        mine = first + jax.lax.broadcasted_iota(jnp.int32, (bm, bn), 0) < end
        value = epilogue(*acc).astype(out_ref.dtype)  # [bm, bn]
        if scatter_ref is None:
            plgpu.store(out_ref.at[pl.ds(first, bm), cols], value, mask=mine)
        else:  # both indices arrays, [bm, 1] destination rows by [1, bn] columns, as interpret mode needs;
            # rows past ``end`` aim past the output (masked off; interpret mode drops them, where a row
            # of the output would be written back with its old value)
            columns = j * bn + jax.lax.broadcasted_iota(jnp.int32, (1, bn), 1)
            plgpu.store(out_ref.at[window(scatter_ref, out_ref.shape[0])[:, None], columns], value, mask=mine)


def _grouped_product(sizes: jax.Array, num_visits: int, x: jax.Array, weights: tuple, scales: tuple, epilogue, *,
                     gather: jax.Array | None, scatter: jax.Array | None, bm: int, bn: int, bk: int,
                     tiling: GpuTiling, name: str) -> jax.Array:
    """Sorted rows [M + bm, K] -> epilogue(rows @ w[e] times scale[e], for w in weights) on each
    visit's rows (e: its expert), stored in row order [M + bm, N] or at out[scatter] [M, N]; rows no
    visit holds are left unwritten. The rows are x [M + bm, K] itself, or x[gather] for an index [M].
    sizes [E'] the group sizes, zero-padded to a power of two; weights [E, K, N] each."""
    k, n = weights[0].shape[1:]
    kernel = functools.partial(_expert_kernel, gathered=gather is not None, scattered=scatter is not None,
                               num_weights=len(weights), epilogue=epilogue, bm=bm, bn=bn, bk=bk, k_steps=k // bk,
                               visits_inner=tiling.visits_inner)
    stage_bytes = bk * (bm * x.dtype.itemsize + len(weights) * bn * weights[0].dtype.itemsize)  # one loop step's tiles
    rows = scatter.shape[0] if scatter is not None else x.shape[0] if gather is None else gather.shape[0] + bm
    indexes = tuple(index for index in (gather, scatter) if index is not None)
    return pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((rows, n), x.dtype),
        grid=(num_visits, n // bn) if tiling.visits_inner else (n // bn, num_visits),
        compiler_params=tiling.compiler_params(len(weights) * bm * bn, stage_bytes),
        platform="cuda",
        interpret=tiling.interpret,
        name=name,
    )(sizes, *indexes, x, *weights, *scales)


def expert_ffn(x: jax.Array, group_sizes: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array,
               gate_scale: jax.Array | None = None, up_scale: jax.Array | None = None,
               down_scale: jax.Array | None = None, *, row_index: jax.Array | None = None,
               out_index: jax.Array | None = None, tiling: GpuTiling = GpuTiling()) -> jax.Array:
    """The expert FFN of rows sorted by expert -> [M, H] in x.dtype, float32 accumulation.

    x [N, H]: the rows themselves (M = N), or, with ``row_index`` [M] int in [0, N), the rows
    ``x[row_index]``, read in place by the gate/up kernel. group_sizes [E] int (may be zero; may sum
    to less than M: the rows past the last group come out zero). gate, up [E, H, I], down [E, I, H]:
    float, or int8 with the float32 scales gate_scale, up_scale [E, I], down_scale [E, H].

    ``out_index`` [M] int, a permutation of [0, M): the down kernel stores sorted row r at row
    ``out_index[r]`` of the result (the MoE layer's (token, expert) order, so that no scatter
    combines them). Then the rows past the last group are not written: their destinations hold
    whatever the buffer held, and the caller masks them."""
    n, hidden = x.shape
    m = n if row_index is None else row_index.shape[0]
    e, _, width = gate.shape
    if gate.shape != (e, hidden, width) or up.shape != gate.shape or down.shape != (e, width, hidden):
        raise ValueError(f"expert_ffn: x {x.shape} with gate {gate.shape}, up {up.shape}, down {down.shape}: "
                         "expected gate, up [E, H, I] and down [E, I, H] with H = x.shape[1]")
    if group_sizes.shape != (e,):
        raise ValueError(f"expert_ffn: group_sizes {group_sizes.shape} for {e} experts")
    for name, index in (("row_index", row_index), ("out_index", out_index)):
        if index is not None and (index.ndim != 1 or not jnp.issubdtype(index.dtype, jnp.integer)):
            raise ValueError(f"expert_ffn: {name} {index.shape} {index.dtype}: expected one int index per row")
    if out_index is not None and out_index.shape != (m,):
        raise ValueError(f"expert_ffn: out_index {out_index.shape} for {m} rows")
    scaled = gate_scale is not None
    if scaled != (up_scale is not None) or scaled != (down_scale is not None):
        raise ValueError("expert_ffn: give all three scales (int8 weights) or none (float weights)")
    bm = tiling.rows_per_visit(m, e)
    bk, hp = _block(tiling.bk, hidden)  # gate/up contract over H
    bn, ip = _block(tiling.bn, width)  # ... and write I columns
    bk_down, _ = _block(tiling.bk_down, ip)  # down contracts over (padded) I
    bn_down, _ = _block(tiling.bn_down, hp)  # ... and writes H columns
    sizes = pad_to(group_sizes.astype(jnp.int32), {0: pl.next_power_of_2(e)})
    num_visits = m // bm + e  # sum over groups of ceil(size / bm) <= M // bm + E; the rest return at once
    index = None if row_index is None else row_index.astype(jnp.int32)  # [M]
    scatter = None if out_index is None else out_index.astype(jnp.int32)  # [M]
    xs = pad_to(x, {0: m + bm, 1: hp} if index is None else {1: hp})  # every visit's [bm] row window stays inside
    gate, up = pad_to(gate, {1: hp, 2: ip}), pad_to(up, {1: hp, 2: ip})
    down = pad_to(down, {1: ip, 2: hp})
    f32 = lambda scale, size: pad_to(scale.astype(jnp.float32), {1: size})  # noqa: E731
    gate_up_scales = (f32(gate_scale, ip), f32(up_scale, ip)) if scaled else ()
    h = _grouped_product(sizes, num_visits, xs, (gate, up), gate_up_scales, _gelu_product, gather=index,
                         scatter=None, bm=bm, bn=bn, bk=bk, tiling=tiling, name="expert_gate_up")  # [M + bm, I]
    y = _grouped_product(sizes, num_visits, h, (down,), (f32(down_scale, hp),) if scaled else (), lambda y: y,
                         gather=None, scatter=scatter, bm=bm, bn=bn_down, bk=bk_down, tiling=tiling,
                         name="expert_down")  # [M + bm, H], or [M, H] in out_index's order
    if scatter is not None:
        return y[:, :hidden]
    grouped = jnp.arange(m)[:, None] < jnp.sum(sizes)  # rows no group owns were never written
    return jnp.where(grouped, y[:m, :hidden], 0)
