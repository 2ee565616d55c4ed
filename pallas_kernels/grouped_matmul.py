"""Grouped matmul for MoE dispatch: Pallas kernels for TPU (Mosaic), ``interpret=True`` elsewhere.

The rows of ``lhs`` [M, K] are sorted by group (expert): group ``g`` owns the rows
``[start_g, end_g)`` with ``end = cumsum(group_sizes)``. A shard of the experts holds only the
groups ``group_offset .. group_offset + G - 1``; rows of every other group come out as zero (and get
zero gradient), so the partial results of the shards add up to the full product.

* :func:`gmm`: ``out[rows_g] = lhs[rows_g] @ rhs[g]``, rhs [G, K, N] -> [M, N].
* :func:`tgmm`: ``out[g] = lhs[rows_g].T @ grad[rows_g]`` -> [G, K, N] (the weight gradient).
* :func:`grouped_matmul`: ``gmm`` with a custom VJP built from the two.

Both kernels walk a list of *visits*: the (group, row tile) pairs in row order. A row tile that
straddles a group boundary is visited once per group it holds, and each visit writes only its own
group's rows. The list has a static length (row tiles + G - 1, the most there can be) and comes in
through scalar prefetch; visits past the real count are skipped, and their block indices repeat the
last real one so they cost no copies. Group sizes may be zero and need not sum to M (the rows after
the last group are zero).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import exact_block, pad_to, pallas_call, round_up


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Largest block sizes: ``tm`` rows, ``tk`` of the contracted dim, ``tn`` output columns. On TPU a
    block dim must be a multiple of 8 (rows) / 128 (lanes) or the whole dim; each block is the
    largest such size that divides its dim (:func:`~pallas_kernels.common.exact_block`), so the
    weights are not padded, which would copy every expert's weights on every call. The defaults fit
    the 26B model's experts without padding (2816 -> 1408, 704 whole) in a few MB of VMEM.
    ``interpret``: None = the Mosaic kernel where the program is lowered for TPU, interpreted
    elsewhere."""

    tm: int = 128
    tk: int = 1536
    tn: int = 1536
    interpret: bool | None = None

    def blocks(self, m: int, k: int, n: int) -> tuple[int, int, int]:
        """-> (rows, contracted, output) block sizes for lhs [m, k] and weights [., k, n]."""
        return exact_block(self.tm, m, 8), exact_block(self.tk, k, 128), exact_block(self.tn, n, 128)


def _local_bounds(group_sizes: jax.Array, group_offset, num_groups: int, m: int):
    """-> starts [G], ends [G]: the row range of each local group, clipped to [0, m]."""
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.minimum(jnp.cumsum(sizes), m)
    starts = jnp.minimum(ends - sizes, m)
    offset = jnp.asarray(group_offset, jnp.int32)
    return (jax.lax.dynamic_slice_in_dim(starts, offset, num_groups),
            jax.lax.dynamic_slice_in_dim(ends, offset, num_groups))


def _visits(starts: jax.Array, ends: jax.Array, m_tiles: int, tm: int):
    """-> group_ids [V + 1] (last entry -1), tile_ids [V], num_visits [1], with V = m_tiles + G - 1."""
    num_groups = starts.shape[0]
    v = m_tiles + num_groups - 1
    first = starts // tm
    tiles = jnp.where(ends > starts, -(-ends // tm) - first, 0)  # row tiles each group touches
    num = jnp.sum(tiles)
    group_ids = jnp.repeat(jnp.arange(num_groups, dtype=jnp.int32), tiles, total_repeat_length=v)
    group_ids = jnp.clip(group_ids, 0, num_groups - 1)
    index = jnp.arange(v, dtype=jnp.int32)
    tile_ids = first[group_ids] + index - (jnp.cumsum(tiles) - tiles)[group_ids]
    last = jnp.maximum(num - 1, 0)  # padding visits repeat the last real one
    group_ids = jnp.where(index < num, group_ids, group_ids[last])
    tile_ids = jnp.clip(jnp.where(index < num, tile_ids, tile_ids[last]), 0, m_tiles - 1)
    return jnp.append(group_ids, -1), tile_ids, num.reshape(1)


def _gmm_kernel(group_ids, tile_ids, starts, ends, num, lhs_ref, rhs_ref, out_ref, acc_ref, *, tm: int,
                k_tiles: int, transpose_rhs: bool):
    visit, k = pl.program_id(1), pl.program_id(2)
    real = visit < num[0]

    @pl.when(k == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(real)
    def _():
        contract = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
        lhs = lhs_ref[...]  # int8 weights (weight-only quantisation) are converted tile by tile
        acc_ref[...] += jax.lax.dot_general(lhs, rhs_ref[...].astype(lhs.dtype), contract,
                                            preferred_element_type=jnp.float32)

    @pl.when(real & (k == k_tiles - 1))
    def _():
        g = group_ids[visit]
        rows = tile_ids[visit] * tm + jax.lax.broadcasted_iota(jnp.int32, acc_ref.shape, 0)
        mine = (rows >= starts[g]) & (rows < ends[g])
        # rows of other groups keep what their own visit of this tile wrote (or will write)
        out_ref[...] = jnp.where(mine, acc_ref[...], out_ref[...].astype(jnp.float32)).astype(out_ref.dtype)


def _tgmm_kernel(group_ids, tile_ids, starts, ends, num, lhs_ref, grad_ref, out_ref, acc_ref, *, tm: int):
    visit = pl.program_id(2)
    g = group_ids[visit]
    real = visit < num[0]
    first_of_group = (visit == 0) | (group_ids[jnp.maximum(visit - 1, 0)] != g)

    @pl.when(first_of_group)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(real)
    def _():
        rows = tile_ids[visit] * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
        mine = (rows >= starts[g]) & (rows < ends[g])
        lhs = jnp.where(mine, lhs_ref[...], 0)
        grad = jnp.where(mine, grad_ref[...], 0)
        acc_ref[...] += jax.lax.dot_general(lhs, grad, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)

    @pl.when(real & ((visit == num[0] - 1) | (group_ids[visit + 1] != g)))
    def _():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, group_offset=0, *, tiling: Tiling = Tiling(),
        transpose_rhs: bool = False, out_dtype=None) -> jax.Array:
    """lhs [M, K], rhs [G, K, N] (or [G, N, K] with ``transpose_rhs``), group_sizes [G_total] int
    -> [M, N] in ``out_dtype`` (default lhs.dtype), float32 accumulation."""
    m, k = lhs.shape
    num_groups = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    if (rhs.shape[2] if transpose_rhs else rhs.shape[1]) != k:
        raise ValueError(f"gmm: lhs {lhs.shape} and rhs {rhs.shape} do not contract (transpose_rhs={transpose_rhs})")
    tm, tk, tn = tiling.blocks(m, k, n)
    mp, kp, np_ = round_up(m, tm), round_up(k, tk), round_up(n, tn)
    starts, ends = _local_bounds(group_sizes, group_offset, num_groups, m)
    group_ids, tile_ids, num = _visits(starts, ends, mp // tm, tm)
    lhs_p = pad_to(lhs, {0: mp, 1: kp})
    if transpose_rhs:
        rhs_p = pad_to(rhs, {1: np_, 2: kp})
        rhs_spec = pl.BlockSpec((None, tn, tk), lambda j, v, i, gid, tid, *_: (gid[v], j, i))
    else:
        rhs_p = pad_to(rhs, {1: kp, 2: np_})
        rhs_spec = pl.BlockSpec((None, tk, tn), lambda j, v, i, gid, tid, *_: (gid[v], i, j))
    k_tiles = kp // tk
    out = pallas_call(
        functools.partial(_gmm_kernel, tm=tm, k_tiles=k_tiles, transpose_rhs=transpose_rhs),
        out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype or lhs.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5,
            grid=(np_ // tn, tile_ids.shape[0], k_tiles),
            in_specs=[pl.BlockSpec((tm, tk), lambda j, v, i, gid, tid, *_: (tid[v], i)), rhs_spec],
            out_specs=pl.BlockSpec((tm, tn), lambda j, v, i, gid, tid, *_: (tid[v], j)),
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        platform="tpu",
        interpret=tiling.interpret,
        name="gmm",
    )(group_ids, tile_ids, starts, ends, num, lhs_p, rhs_p)
    rows = jnp.arange(mp)[:, None]
    local = (rows >= starts[0]) & (rows < ends[-1])  # rows no local group owns were never written
    return jnp.where(local, out, 0)[:m, :n]


def tgmm(lhs: jax.Array, grad: jax.Array, group_sizes: jax.Array, num_groups: int, group_offset=0, *,
         tiling: Tiling = Tiling(), out_dtype=None) -> jax.Array:
    """lhs [M, K], grad [M, N] -> [num_groups, K, N]: per local group, lhs[rows].T @ grad[rows]
    (zero for an empty group), float32 accumulation."""
    m, k = lhs.shape
    n = grad.shape[1]
    if grad.shape[0] != m:
        raise ValueError(f"tgmm: lhs {lhs.shape} and grad {grad.shape} have different row counts")
    tm, tk, tn = tiling.blocks(m, k, n)
    mp, kp, np_ = round_up(m, tm), round_up(k, tk), round_up(n, tn)
    starts, ends = _local_bounds(group_sizes, group_offset, num_groups, m)
    group_ids, tile_ids, num = _visits(starts, ends, mp // tm, tm)
    out = pallas_call(
        functools.partial(_tgmm_kernel, tm=tm),
        out_shape=jax.ShapeDtypeStruct((num_groups, kp, np_), out_dtype or lhs.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5,
            grid=(kp // tk, np_ // tn, tile_ids.shape[0]),
            in_specs=[pl.BlockSpec((tm, tk), lambda i, j, v, gid, tid, *_: (tid[v], i)),
                      pl.BlockSpec((tm, tn), lambda i, j, v, gid, tid, *_: (tid[v], j))],
            out_specs=pl.BlockSpec((None, tk, tn), lambda i, j, v, gid, tid, *_: (gid[v], i, j)),
            scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        platform="tpu",
        interpret=tiling.interpret,
        name="tgmm",
    )(group_ids, tile_ids, starts, ends, num, pad_to(lhs, {0: mp, 1: kp}),
      pad_to(grad, {0: mp, 1: np_}))
    return jnp.where((ends > starts)[:, None, None], out, 0)[:, :k, :n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, group_offset, tiling: Tiling = Tiling()):
    """Differentiable :func:`gmm` (with respect to ``lhs`` and ``rhs``): lhs [M, K], rhs [G, K, N],
    group_sizes [G_total] int, group_offset (int or traced scalar) -> [M, N]."""
    return gmm(lhs, rhs, group_sizes, group_offset, tiling=tiling)


def _grouped_matmul_fwd(lhs, rhs, group_sizes, group_offset, tiling):
    return gmm(lhs, rhs, group_sizes, group_offset, tiling=tiling), (lhs, rhs, group_sizes, group_offset)


def _grouped_matmul_bwd(tiling, saved, grad):
    lhs, rhs, group_sizes, group_offset = saved
    d_lhs = gmm(grad, rhs, group_sizes, group_offset, tiling=tiling, transpose_rhs=True, out_dtype=lhs.dtype)
    d_rhs = tgmm(lhs, grad, group_sizes, rhs.shape[0], group_offset, tiling=tiling, out_dtype=rhs.dtype)
    return d_lhs, d_rhs, None, None


grouped_matmul.defvjp(_grouped_matmul_fwd, _grouped_matmul_bwd)
