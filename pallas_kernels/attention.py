"""Flash-style masked attention for DiffusionGemma's two passes: Pallas kernels for TPU (Mosaic),
``interpret=True`` elsewhere. Forward with an online softmax, backward (dq; dk/dv) recomputing the
probabilities from the saved log-sum-exp, all behind a custom VJP.

Masks (never materialised):

* ``causal`` (encoder pass): the queries of row ``b`` sit at positions ``offsets[b] + t``; a query
  at position ``p`` sees key slot ``s <= p``, and with a ``window`` only ``s > p - window``.
* ``canvas`` (denoising pass, keys = ``cache (cache_size slots) | canvas``): every query sees the
  whole canvas and the filled cache slots ``s < offsets[b]`` (KV-length masking of a partly filled
  cache); with a ``window`` only the last ``window - 1`` of them. Without a window this is full
  attention over the filled cache and the canvas.

The forward and dq kernels' grids walk, per query block, only the key blocks its mask shows
(``Mask.key_block``): on a 26B sliding layer at 4,096 cached positions that is 11 steps of 34, and
the blocks it leaves out are never fetched. The dk/dv kernel skips the empty (query block, key
block) pairs. A forward program holds all the query heads of one key/value head, so each key and
value tile is fetched once per query block; the backward kernels take one query head each. The
canvas pass may take the cache and the canvas keys as two inputs (``flash_attention(...,
canvas=(k, v))``), read where they are.

Attention scale is 1.0 (the model RMS-norms q and k). Grouped-query attention: query head ``n``
reads key/value head ``n // (N / K)``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import fit, pallas_call, round_up

MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: exp(MASKED - MASKED) stays defined


@dataclasses.dataclass(frozen=True)
class Mask:
    """``kind``: "causal" or "canvas"; ``window``: sliding window or None; ``cache_size``: cache
    slots before the canvas keys (canvas); ``num_keys``: real keys (the rest is block padding)."""

    kind: str
    window: int | None
    cache_size: int
    num_keys: int

    def __post_init__(self):
        if self.kind not in ("causal", "canvas"):
            raise ValueError(f"mask kind {self.kind!r}: expected 'causal' or 'canvas'")

    def visible(self, offset, t, s):
        """Query rows t and key slots s (broadcastable int arrays) of a row with this offset -> bool."""
        if self.kind == "causal":
            pos = offset + t
            ok = s <= pos
            if self.window is not None:
                ok &= s > pos - self.window
            return ok & (s < self.num_keys)
        cached = s < offset
        if self.window is not None:
            cached &= s >= offset - (self.window - 1)
        return (cached | (s >= self.cache_size)) & (s < self.num_keys)

    def key_steps(self, bq: int, bk: int, num_blocks: int) -> int:
        """The most key blocks one query block sees (static): the length of the grid's key axis, so
        the grid does not step over the blocks a sliding window leaves out."""
        if self.window is None:
            return num_blocks
        if self.kind == "causal":  # keys (p - window, p] for the bq positions p of the block
            return min(num_blocks, -(-(self.window + bq - 1) // bk) + 1)
        cached = -(-(self.window - 1) // bk) + 1  # blocks holding the last window - 1 cache slots
        return min(num_blocks, cached + num_blocks - self.cache_size // bk)

    def key_block(self, offset, qi, step, bq: int, bk: int, num_blocks: int):
        """Grid step ``step`` of query block ``qi`` -> (its key block, whether the step is real).
        A query block's visible key blocks are one run (causal), or a run of filled cache slots then
        the canvas blocks (canvas); the steps walk them in order, and the steps past them repeat the
        last block, so that its tile is not fetched again."""
        if self.kind == "causal":
            first_pos = offset + qi * bq
            end = jnp.minimum(num_blocks, (first_pos + bq - 1) // bk + 1)
            start = 0 if self.window is None else jnp.maximum(0, (first_pos - self.window + 1) // bk)
            return jnp.minimum(start + step, end - 1), step < end - start
        start = 0 if self.window is None else jnp.maximum(0, (offset - (self.window - 1)) // bk)
        cached = jnp.maximum((offset + bk - 1) // bk - start, 0)  # blocks with visible cache slots
        canvas = jnp.maximum(self.cache_size // bk, start + cached)  # first block not among those
        block = jnp.where(step < cached, start + step, canvas + step - cached)
        return jnp.minimum(block, num_blocks - 1), step < cached + num_blocks - canvas

    def block_visible(self, offset, t0, t1, s0, s1):
        """Whether any (t, s) with t0 <= t < t1, s0 <= s < s1 is visible (scalar bool)."""
        if self.kind == "causal":
            ok = s0 <= offset + t1 - 1
            if self.window is not None:
                ok &= s1 - 1 > offset + t0 - self.window
            return ok
        lo = offset - (self.window - 1) if self.window is not None else 0
        return (s1 > self.cache_size) | ((s0 < offset) & (s1 > lo))


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Block sizes along queries and keys; ``interpret``: None = the Mosaic kernel where the program
    is lowered for TPU, interpreted elsewhere."""

    q: int = 128
    k: int = 128
    interpret: bool | None = None


def _scores(mask: Mask, offset, q, k, qi, ki, bq, bk):
    """One block of masked scores, float32 [rows, bk]: q holds bq query positions, or G x bq (the
    query heads of one key/value head, one after another), against bk keys."""
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    t = qi * bq + jax.lax.broadcasted_iota(jnp.int32, s.shape, 0) % bq
    slot = ki * bk + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
    return jnp.where(mask.visible(offset, t, slot), s, MASKED)


def _tile(refs, ki, cache_blocks: int):
    """The key (or value) tile of block ``ki`` from one array, or from the cache's or the canvas's."""
    return refs[0][...] if len(refs) == 1 else jnp.where(ki < cache_blocks, refs[0][...], refs[1][...])


def _forward_kernel(offsets, q_ref, *refs, mask: Mask, bq: int, bk: int, num_blocks: int, cache_blocks: int,
                    parts: int):
    k_refs, v_refs = refs[:parts], refs[parts:2 * parts]
    o_ref, lse_ref, m_sc, l_sc, acc_sc = refs[2 * parts:]
    b, qi, step = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    offset = offsets[b]
    ki, real = mask.key_block(offset, qi, step, bq, bk, num_blocks)

    @pl.when(step == 0)
    def _():
        m_sc[...] = jnp.full_like(m_sc, -jnp.inf)
        l_sc[...] = jnp.zeros_like(l_sc)
        acc_sc[...] = jnp.zeros_like(acc_sc)

    @pl.when(real)
    def _():
        q = q_ref[...]  # [G, bq, D]: the query heads of this key/value head
        s = _scores(mask, offset, q.reshape(-1, q.shape[-1]), _tile(k_refs, ki, cache_blocks), qi, ki, bq, bk)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))  # [G * bq, 1]
        p = jnp.exp(s - m_new)
        alpha = jnp.exp(m_prev - m_new)
        l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
        v = _tile(v_refs, ki, cache_blocks)
        acc_sc[...] = alpha * acc_sc[...] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        m_sc[...] = m_new

    @pl.when(step == pl.num_programs(3) - 1)
    def _():
        o_ref[...] = (acc_sc[...] / l_sc[...]).reshape(o_ref.shape).astype(o_ref.dtype)
        lse_ref[...] = (m_sc[...] + jnp.log(l_sc[...])).reshape(lse_ref.shape)


def _probs(mask, offset, q, k, lse, qi, ki, bq, bk):
    return jnp.exp(_scores(mask, offset, q, k, qi, ki, bq, bk) - lse)  # [bq, bk]; masked -> 0


def _dq_kernel(offsets, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, dq_ref, dq_sc, *, mask: Mask, bq: int,
               bk: int, num_blocks: int):
    b, qi, step = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    offset = offsets[b]
    ki, real = mask.key_block(offset, qi, step, bq, bk, num_blocks)

    @pl.when(step == 0)
    def _():
        dq_sc[...] = jnp.zeros_like(dq_sc)

    @pl.when(real)
    def _():
        k = k_ref[...]
        p = _probs(mask, offset, q_ref[...], k, lse_ref[...], qi, ki, bq, bk)
        dp = jax.lax.dot_general(do_ref[...], v_ref[...], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        ds = p * (dp - di_ref[...])
        dq_sc[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    @pl.when(step == pl.num_programs(3) - 1)
    def _():
        dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)


def _dkv_kernel(offsets, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, dk_ref, dv_ref, dk_sc, dv_sc, *, mask: Mask,
                bq: int, bk: int):
    b, ki, qi = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    offset = offsets[b]

    @pl.when(qi == 0)
    def _():
        dk_sc[...] = jnp.zeros_like(dk_sc)
        dv_sc[...] = jnp.zeros_like(dv_sc)

    @pl.when(mask.block_visible(offset, qi * bq, (qi + 1) * bq, ki * bk, (ki + 1) * bk))
    def _():
        q, do = q_ref[...], do_ref[...]
        p = _probs(mask, offset, q, k_ref[...], lse_ref[...], qi, ki, bq, bk)
        transpose = (((0,), (0,)), ((), ()))
        dv_sc[...] += jax.lax.dot_general(p.astype(do.dtype), do, transpose, preferred_element_type=jnp.float32)
        dp = jax.lax.dot_general(do, v_ref[...], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        ds = p * (dp - di_ref[...])
        dk_sc[...] += jax.lax.dot_general(ds.astype(q.dtype), q, transpose, preferred_element_type=jnp.float32)

    @pl.when(qi == pl.num_programs(3) - 1)
    def _():
        dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _specs(bq, bk, d, group):
    """BlockSpecs over [B, N, T, D] queries, [B, K, S, D] keys and [B, N, T, 1] row statistics,
    for a grid (b, n, i, j), the block along T or S given as a function of (offset, i, j)."""
    def q_spec(qi_of):
        return pl.BlockSpec((None, None, bq, d), lambda b, n, i, j, offsets: (b, n, qi_of(offsets[b], i, j), 0))

    def k_spec(ki_of):
        return pl.BlockSpec((None, None, bk, d),
                            lambda b, n, i, j, offsets: (b, n // group, ki_of(offsets[b], i, j), 0))

    def row_spec(qi_of):
        return pl.BlockSpec((None, None, bq, 1), lambda b, n, i, j, offsets: (b, n, qi_of(offsets[b], i, j), 0))

    return q_spec, k_spec, row_spec


def _call(kernel, grid, in_specs, out_specs, out_shape, scratch, blocks: Blocks, name: str, offsets, *args):
    return pallas_call(
        kernel,
        out_shape=out_shape,
        grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=1, grid=grid, in_specs=in_specs,
                                               out_specs=out_specs, scratch_shapes=scratch),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        platform="tpu",
        interpret=blocks.interpret,
        name=name,
    )(offsets, *args)


def _walked(mask: Mask, bq: int, bk: int, num_blocks: int, lo: int = 0, hi: int | None = None):
    """-> (offset, i, j) -> the key block of grid step j of query block i, for an index map over the
    keys' blocks lo .. hi - 1 (one part of them: the cache's or the canvas's), where the walk is
    elsewhere held at the part's nearest block, so that nothing new is fetched."""
    hi = num_blocks if hi is None else hi
    return lambda offset, i, j: jnp.clip(mask.key_block(offset, i, j, bq, bk, num_blocks)[0] - lo, 0, hi - lo - 1)


def _forward(q, ks, vs, offsets, mask: Mask, blocks: Blocks):
    """q [B, K, G, Tp, D] (each key/value head's G query heads); ks/vs: the keys/values [B, K, Sp, D]
    as one array, or as the cache's and the canvas's, each padded to whole blocks
    -> (o [B, K, G, Tp, D], lse [B, K, G, Tp, 1]). A program holds all G query heads of its
    key/value head, so each key and value tile is fetched once per query block, not once per head."""
    b, kh, group, t, d = q.shape
    bq, bk = blocks.q, blocks.k
    num_blocks, cache_blocks = sum(k.shape[2] for k in ks) // bk, ks[0].shape[2] // bk
    rows_spec = lambda width: pl.BlockSpec((None, None, group, bq, width),  # noqa: E731
                                           lambda b, h, i, j, offsets: (b, h, 0, i, 0))

    def key_spec(lo, hi):
        block = _walked(mask, bq, bk, num_blocks, lo, hi)
        return pl.BlockSpec((None, None, bk, d), lambda b, h, i, j, offsets: (b, h, block(offsets[b], i, j), 0))

    parts = [(0, num_blocks)] if len(ks) == 1 else [(0, cache_blocks), (cache_blocks, num_blocks)]
    key_specs = [key_spec(lo, hi) for lo, hi in parts]
    scratch = [pltpu.VMEM((group * bq, 1), jnp.float32)] * 2 + [pltpu.VMEM((group * bq, d), jnp.float32)]
    return _call(
        functools.partial(_forward_kernel, mask=mask, bq=bq, bk=bk, num_blocks=num_blocks,
                          cache_blocks=cache_blocks, parts=len(ks)),
        (b, kh, t // bq, mask.key_steps(bq, bk, num_blocks)),
        [rows_spec(d)] + key_specs * 2, [rows_spec(d), rows_spec(1)],
        [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, kh, group, t, 1), jnp.float32)],
        scratch, blocks, "flash_attention_fwd", offsets, q, *ks, *vs)


def _backward(q, k, v, offsets, o, lse, do, mask: Mask, blocks: Blocks):
    b, n, t, d = q.shape
    kh, s = k.shape[1], k.shape[2]
    group = n // kh
    bq, bk = blocks.q, blocks.k
    di = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1, keepdims=True)  # [B, N, T, 1]
    q_spec, k_spec, row_spec = _specs(bq, bk, d, group)
    first, second = (lambda offset, i, j: i), (lambda offset, i, j: j)
    walked = _walked(mask, bq, bk, s // bk)
    dq = _call(
        functools.partial(_dq_kernel, mask=mask, bq=bq, bk=bk, num_blocks=s // bk),
        (b, n, t // bq, mask.key_steps(bq, bk, s // bk)),
        [q_spec(first), k_spec(walked), k_spec(walked), q_spec(first), row_spec(first), row_spec(first)],
        q_spec(first), jax.ShapeDtypeStruct(q.shape, q.dtype), [pltpu.VMEM((bq, d), jnp.float32)],
        blocks, "flash_attention_dq", offsets, q, k, v, do, lse, di)
    # per query head, summed over each key head's group afterwards
    per_head = pl.BlockSpec((None, None, bk, d), lambda b, n, i, j, *_: (b, n, i, 0))
    dk, dv = _call(
        functools.partial(_dkv_kernel, mask=mask, bq=bq, bk=bk), (b, n, s // bk, t // bq),
        [q_spec(second), k_spec(first), k_spec(first), q_spec(second), row_spec(second), row_spec(second)],
        [per_head, per_head], [jax.ShapeDtypeStruct((b, n, s, d), k.dtype)] * 2,
        [pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
        blocks, "flash_attention_dkv", offsets, q, k, v, do, lse, di)
    fold = lambda x: x.reshape(b, kh, group, s, d).sum(axis=2)  # noqa: E731
    return dq, fold(dk), fold(dv)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q, ks, vs, offsets, mask: Mask, blocks: Blocks):
    return _forward(q, ks, vs, offsets, mask, blocks)[0]


def _attention_fwd(q, ks, vs, offsets, mask, blocks):
    o, lse = _forward(q, ks, vs, offsets, mask, blocks)
    return o, (q, ks, vs, offsets, o, lse)


def _attention_bwd(mask, blocks, saved, do):
    q, ks, vs, offsets, o, lse = saved
    b, kh, group, t, d = q.shape
    heads = lambda x: x.reshape(b, kh * group, t, x.shape[-1])  # noqa: E731  [B, K, G, T, X] -> [B, N, T, X]
    joined = lambda parts: parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=2)  # noqa: E731
    # the backward (training) takes the keys as one array, and one query head after another
    dq, dk, dv = _backward(heads(q), joined(ks), joined(vs), offsets, heads(o), heads(lse), heads(do), mask, blocks)
    cuts = [k.shape[2] for k in ks[:-1]]
    return dq.reshape(q.shape), tuple(jnp.split(dk, cuts, axis=2)), tuple(jnp.split(dv, cuts, axis=2)), None


_attention.defvjp(_attention_fwd, _attention_bwd)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, offsets: jax.Array, *, kind: str,
                    window: int | None = None, cache_size: int = 0,
                    canvas: tuple[jax.Array, jax.Array] | None = None, blocks: Blocks = Blocks()) -> jax.Array:
    """q [B, T, N, D], k/v [B, K, S, D] (heads first, as the KV cache), offsets [B] int (causal:
    position of query 0; canvas: filled cache slots) -> [B, T, N, D]. The canvas pass's keys are
    either k/v, the ``cache_size`` cache slots then the canvas, or k/v the cache alone and
    ``canvas`` the canvas keys and values [B, K, L, D]: then the kernel reads both where they are,
    without concatenating them (when S is a multiple of the key block; else they are concatenated).
    Differentiable in q, k, v and ``canvas``."""
    b, t, n, d = q.shape
    kh = k.shape[1]
    if n % kh or v.shape != k.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"flash_attention: q {q.shape}, k {k.shape}, v {v.shape} do not fit [B, T, N, D] / "
                         f"[B, K, S, D] with N a multiple of K")
    if canvas is not None:
        if kind != "canvas":
            raise ValueError(f"flash_attention: kind={kind!r} takes no canvas keys")
        if canvas[0].shape != canvas[1].shape or canvas[0].shape[:2] != (b, kh) or canvas[0].shape[3] != d:
            raise ValueError(f"flash_attention: canvas keys {canvas[0].shape} / values {canvas[1].shape} do not "
                             f"fit [B={b}, K={kh}, L, D={d}]")
        cache_size = k.shape[2]
    s = k.shape[2] + (0 if canvas is None else canvas[0].shape[2])
    if kind == "canvas" and not 0 <= cache_size <= s:
        raise ValueError(f"flash_attention: cache_size={cache_size} outside the {s} keys")
    bq, bk = fit(blocks.q, t, 8), fit(blocks.k, s, 8)
    ks, vs = [k], [v]
    if canvas is not None:
        if cache_size % bk:  # the canvas would start inside a block
            ks, vs = [jnp.concatenate([k, canvas[0]], axis=2)], [jnp.concatenate([v, canvas[1]], axis=2)]
        else:
            ks, vs = [k, canvas[0]], [v, canvas[1]]
    tp, pad = round_up(t, bq), round_up(s, bk) - s
    ks[-1], vs[-1] = (jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0))) for x in (ks[-1], vs[-1]))  # whole blocks
    q = jnp.pad(q, ((0, 0), (0, tp - t), (0, 0), (0, 0))).transpose(0, 2, 1, 3).reshape(b, kh, n // kh, tp, d)
    o = _attention(q, tuple(ks), tuple(vs), offsets.astype(jnp.int32), Mask(kind, window, cache_size, s),
                   dataclasses.replace(blocks, q=bq, k=bk))  # [B, K, G, Tp, D]
    return o.reshape(b, n, tp, d).transpose(0, 2, 1, 3)[:, :t]
