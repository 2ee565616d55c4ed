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
the blocks it leaves out are never fetched. The dk/dv kernel's grid walks, per key block, only the
query blocks that see it (``Mask.query_block``). Every program holds all the query heads of one
key/value head as its rows, so each key and value tile (forward, dq) or query tile (dk/dv) is
fetched once for all of them, and dk/dv are written once per key/value head. The canvas pass may
take the cache and the canvas keys as two inputs (``flash_attention(..., canvas=(k, v))``), read
where they are, and their gradients come back the same way.

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

    def query_steps(self, bq: int, bk: int, num_blocks: int) -> int:
        """The most query blocks that see one key block (static): the dk/dv grid's query axis."""
        if self.kind == "causal" and self.window is not None:  # positions [s, s + window) of the bk slots s
            return min(num_blocks, -(-(self.window + bk - 1) // bq) + 1)
        return num_blocks

    def query_block(self, offset, ki, step, bq: int, bk: int, num_blocks: int):
        """Grid step ``step`` of key block ``ki`` in the dk/dv kernel -> (its query block, whether the
        step is real): the query blocks that see the key block, in order (a canvas key block is seen by
        all query blocks or none; a causal one by a run of them), then the last one repeated."""
        if self.kind == "canvas":
            seen = self.block_visible(offset, 0, bq, ki * bk, (ki + 1) * bk)
            return jnp.where(seen, step, num_blocks - 1), seen
        first = jnp.maximum(ki * bk - offset, 0) // bq  # the first row at or after the block's first slot
        last = num_blocks - 1
        if self.window is not None:  # the last row whose window reaches the block's last slot
            last = jnp.minimum(last, (ki * bk + bk - 1 + self.window - 1 - offset) // bq)
        return jnp.clip(first + step, 0, jnp.maximum(last, 0)), (first + step <= last)

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
    """Block sizes along queries and keys, and the scoped VMEM the kernels may take (MiB; None:
    Mosaic's default, 16 MiB on v5e); a size left None is the pass's default (``PASS_BLOCKS``).
    Mosaic takes a query block that is a multiple of 128 (the lanes of the row statistics), or the
    whole of a pass's queries.
    ``interpret``: None = the Mosaic kernel where the program is lowered for TPU, interpreted
    elsewhere."""

    q: int | None = None
    k: int | None = None
    vmem_mib: int | None = None
    interpret: bool | None = None

    def for_pass(self, kind: str) -> "Blocks":
        """These blocks, the sizes left None taken from ``PASS_BLOCKS[kind]``."""
        if kind not in PASS_BLOCKS:
            raise ValueError(f"mask kind {kind!r}: expected 'causal' or 'canvas'")
        default = PASS_BLOCKS[kind]
        return dataclasses.replace(self, **{f: getattr(default, f) for f in ("q", "k", "vmem_mib")
                                            if getattr(self, f) is None})


# Chosen by the bytes that bench/tpu_attention.py counts at the 26B layers' shapes on v5e (docs/scaling.md):
# 256 x 256 blocks read each key tile half as often as 128 x 128 ones (a canvas pass's query block is its
# whole canvas: each key tile is read once) in half the grid steps. On a full layer (8 query heads of
# 512 per key/value head) the kernels then need more than Mosaic's default 16 MiB of VMEM, of v5e's 128:
# the encoder pass's 24-32 MiB, the canvas pass's forward in the 26B train step 29.9 MiB.
PASS_BLOCKS = {"causal": Blocks(256, 256, vmem_mib=32), "canvas": Blocks(256, 256, vmem_mib=32)}


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


def _rows(ref):
    """A [G, bq, X] block of rows (the query heads of one key/value head) -> [G * bq, X]."""
    x = ref[...]
    return x.reshape(-1, x.shape[-1])


def _column(ref):
    """A [G, 1, bq] block of row statistics (the log-sum-exp, or di), lane-dense -> [G * bq, 1]
    (head by head: Mosaic turns a row of lanes into a column, not a [G, 1, bq] block at once)."""
    return jnp.concatenate([ref[g, 0][:, None] for g in range(ref.shape[0])], axis=0)


def _forward_kernel(offsets, q_ref, *refs, mask: Mask, bq: int, bk: int, num_blocks: int, cache_blocks: int,
                    parts: int):
    k_refs, v_refs = refs[:parts], refs[parts:2 * parts]
    o_ref, *lse_refs, m_sc, l_sc, acc_sc = refs[2 * parts:]  # the log-sum-exp's ref, or none (``_forward``)
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
        s = _scores(mask, offset, _rows(q_ref), _tile(k_refs, ki, cache_blocks), qi, ki, bq, bk)  # [G * bq, bk]
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
        for lse_ref in lse_refs:  # [G * bq, 1] -> [G, 1, bq]
            lse_ref[...] = (m_sc[...] + jnp.log(l_sc[...])).reshape(lse_ref.shape[0], bq)[:, None, :]


def _score_grads(mask, offset, q, k, v, do, lse_ref, di_ref, qi, ki, bq, bk):
    """One block's probabilities and score gradients, float32 [G * bq, bk] each (masked -> 0), from
    the rows q, do [G * bq, D] and the row statistics' refs [G, 1, bq]."""
    p = jnp.exp(_scores(mask, offset, q, k, qi, ki, bq, bk) - _column(lse_ref))
    dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return p, p * (dp - _column(di_ref))


def _dq_kernel(offsets, q_ref, *refs, mask: Mask, bq: int, bk: int, num_blocks: int, cache_blocks: int,
               parts: int):
    k_refs, v_refs = refs[:parts], refs[parts:2 * parts]
    do_ref, lse_ref, di_ref, dq_ref, dq_sc = refs[2 * parts:]
    b, qi, step = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    offset = offsets[b]
    ki, real = mask.key_block(offset, qi, step, bq, bk, num_blocks)

    @pl.when(step == 0)
    def _():
        dq_sc[...] = jnp.zeros_like(dq_sc)

    @pl.when(real)
    def _():
        k = _tile(k_refs, ki, cache_blocks)
        _, ds = _score_grads(mask, offset, _rows(q_ref), k, _tile(v_refs, ki, cache_blocks), _rows(do_ref),
                             lse_ref, di_ref, qi, ki, bq, bk)
        dq_sc[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    @pl.when(step == pl.num_programs(3) - 1)
    def _():
        dq_ref[...] = dq_sc[...].reshape(dq_ref.shape).astype(dq_ref.dtype)


def _dkv_kernel(offsets, q_ref, *refs, mask: Mask, bq: int, bk: int, num_q_blocks: int, cache_blocks: int,
                parts: int):
    k_refs, v_refs = refs[:parts], refs[parts:2 * parts]
    do_ref, lse_ref, di_ref = refs[2 * parts:2 * parts + 3]
    dk_refs, dv_refs = refs[2 * parts + 3:3 * parts + 3], refs[3 * parts + 3:4 * parts + 3]
    dk_sc, dv_sc = refs[4 * parts + 3:]
    b, ki, step = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    offset = offsets[b]
    qi, real = mask.query_block(offset, ki, step, bq, bk, num_q_blocks)

    @pl.when(step == 0)
    def _():
        dk_sc[...] = jnp.zeros_like(dk_sc)
        dv_sc[...] = jnp.zeros_like(dv_sc)

    @pl.when(real)
    def _():
        q, do = _rows(q_ref), _rows(do_ref)
        p, ds = _score_grads(mask, offset, q, _tile(k_refs, ki, cache_blocks), _tile(v_refs, ki, cache_blocks), do,
                             lse_ref, di_ref, qi, ki, bq, bk)
        transpose = (((0,), (0,)), ((), ()))
        dv_sc[...] += jax.lax.dot_general(p.astype(do.dtype), do, transpose, preferred_element_type=jnp.float32)
        dk_sc[...] += jax.lax.dot_general(ds.astype(q.dtype), q, transpose, preferred_element_type=jnp.float32)

    for part, (dk_ref, dv_ref) in enumerate(zip(dk_refs, dv_refs)):  # written to the part key block ki is in
        owned = (ki < cache_blocks) if part == 0 else (ki >= cache_blocks)

        @pl.when((step == pl.num_programs(3) - 1) & owned)
        def _():
            dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
            dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _call(kernel, grid, in_specs, out_specs, out_shape, scratch, blocks: Blocks, name: str, offsets, *args,
          axis2: str = "parallel"):
    """The kernel over grid (row, key/value head, axis 2, walk); ``axis2``: the semantics of axis 2 (the
    query blocks of the forward and dq kernels, the key blocks of the dk/dv kernel)."""
    return pallas_call(
        kernel,
        out_shape=out_shape,
        grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=1, grid=grid, in_specs=in_specs,
                                               out_specs=out_specs, scratch_shapes=scratch),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", axis2, "arbitrary"),
            vmem_limit_bytes=None if blocks.vmem_mib is None else blocks.vmem_mib * 2**20),
        platform="tpu",
        interpret=blocks.interpret,
        name=name,
    )(offsets, *args)


def _row_spec(group: int, bq: int, width: int | None, block_of):
    """BlockSpec of one key/value head's G query heads' rows [B, K, G, Tp, width], or with ``width``
    None of their statistics [B, K, G, 1, Tp] (float32 rows along the lanes: as a [.., Tp, 1] column
    each would fill a 128-lane tile in HBM), the query block given by ``block_of(offset, i, j)`` of
    the grid step (b, h, i, j)."""
    if width is None:
        return pl.BlockSpec((None, None, group, 1, bq), lambda b, h, i, j, offsets: (
            b, h, 0, 0, block_of(offsets[b], i, j)))
    return pl.BlockSpec((None, None, group, bq, width), lambda b, h, i, j, offsets: (
        b, h, 0, block_of(offsets[b], i, j), 0))


def _key_specs(bk: int, d: int, parts, block_of):
    """BlockSpecs of the keys' (or values') parts [B, K, S_part, D], whose key blocks lo .. hi - 1 of
    all of them are ``parts``; the key block ``block_of(offset, i, j)`` of the grid step, held at a
    part's nearest block while it lies in another part, so that nothing new is fetched."""
    def spec(lo, hi):
        def index(b, h, i, j, offsets):
            return b, h, jnp.clip(block_of(offsets[b], i, j) - lo, 0, hi - lo - 1), 0
        return pl.BlockSpec((None, None, bk, d), index)

    return [spec(lo, hi) for lo, hi in parts]


def _parts(ks, bk: int):
    """The key blocks [lo, hi) of each of the keys' parts (one array, or the cache's and the canvas's)."""
    cuts = [0]
    for k in ks:
        cuts.append(cuts[-1] + k.shape[2] // bk)
    return list(zip(cuts[:-1], cuts[1:]))


def _walking_keys(mask: Mask, group: int, bq: int, bk: int, d: int, parts):
    """-> (rows(width): the query rows' spec (``_row_spec``), the keys' specs) of a grid (b, h, query block, step)
    that walks each query block's visible key blocks (the forward and dq kernels)."""
    walked = lambda offset, i, j: mask.key_block(offset, i, j, bq, bk, parts[-1][1])[0]  # noqa: E731
    return (lambda width: _row_spec(group, bq, width, lambda offset, i, j: i)), _key_specs(bk, d, parts, walked)


def _forward(q, ks, vs, offsets, mask: Mask, blocks: Blocks, with_lse: bool = True):
    """q [B, K, G, Tp, D] (each key/value head's G query heads); ks/vs: the keys/values [B, K, Sp, D]
    as one array, or as the cache's and the canvas's, each padded to whole blocks
    -> (o [B, K, G, Tp, D], lse [B, K, G, 1, Tp] float32, or None without ``with_lse``: a forward
    that nothing differentiates does not write it). A program holds all G query heads of its
    key/value head, so each key and value tile is fetched once per query block, not once per head."""
    b, kh, group, t, d = q.shape
    bq, bk = blocks.q, blocks.k
    parts = _parts(ks, bk)
    num_blocks, cache_blocks = parts[-1][1], parts[0][1]
    rows, keys = _walking_keys(mask, group, bq, bk, d, parts)
    scratch = [pltpu.VMEM((group * bq, 1), jnp.float32)] * 2 + [pltpu.VMEM((group * bq, d), jnp.float32)]
    lse = [jax.ShapeDtypeStruct((b, kh, group, 1, t), jnp.float32)] if with_lse else []
    out = _call(
        functools.partial(_forward_kernel, mask=mask, bq=bq, bk=bk, num_blocks=num_blocks,
                          cache_blocks=cache_blocks, parts=len(parts)),
        (b, kh, t // bq, mask.key_steps(bq, bk, num_blocks)),
        [rows(d)] + keys * 2, [rows(d)] + [rows(None)] * len(lse), [jax.ShapeDtypeStruct(q.shape, q.dtype)] + lse,
        scratch, blocks, "flash_attention_fwd", offsets, q, *ks, *vs)
    return out[0], (out[1] if with_lse else None)


def _backward(q, ks, vs, offsets, o, lse, do, mask: Mask, blocks: Blocks):
    """The forward's inputs, its outputs and the output gradient (all as in ``_forward``) -> (dq, the
    keys' gradient parts, the values' gradient parts). Both kernels hold one key/value head's G query
    heads, as the forward does: the dq kernel walks the visible key blocks of a query block, the dk/dv
    kernel the query blocks that see a key block, and each writes each key/value head's gradient
    once, in the keys' parts (no concatenation, no sum over query heads afterwards)."""
    b, kh, group, t, d = q.shape
    bq, bk = blocks.q, blocks.k
    parts = _parts(ks, bk)
    num_blocks, cache_blocks, num_q_blocks = parts[-1][1], parts[0][1], t // bq
    di = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)[:, :, :, None]  # [B, K, G, 1, Tp]
    settings = dict(mask=mask, bq=bq, bk=bk, cache_blocks=cache_blocks, parts=len(parts))

    rows, keys = _walking_keys(mask, group, bq, bk, d, parts)
    dq = _call(
        functools.partial(_dq_kernel, num_blocks=num_blocks, **settings),
        (b, kh, num_q_blocks, mask.key_steps(bq, bk, num_blocks)),
        [rows(d)] + keys * 2 + [rows(d), rows(None), rows(None)], rows(d), jax.ShapeDtypeStruct(q.shape, q.dtype),
        [pltpu.VMEM((group * bq, d), jnp.float32)], blocks, "flash_attention_dq", offsets, q, *ks, *vs, do, lse, di)

    seen_by = lambda offset, i, j: mask.query_block(offset, i, j, bq, bk, num_q_blocks)[0]  # noqa: E731
    rows = lambda width: _row_spec(group, bq, width, seen_by)  # noqa: E731
    keys = _key_specs(bk, d, parts, lambda offset, i, j: i)
    grads = _call(
        functools.partial(_dkv_kernel, num_q_blocks=num_q_blocks, **settings),
        (b, kh, num_blocks, mask.query_steps(bq, bk, num_q_blocks)),
        [rows(d)] + keys * 2 + [rows(d), rows(None), rows(None)], keys * 2,
        [jax.ShapeDtypeStruct(k.shape, k.dtype) for k in ks] + [jax.ShapeDtypeStruct(v.shape, v.dtype) for v in vs],
        [pltpu.VMEM((bk, d), jnp.float32)] * 2, blocks, "flash_attention_dkv", offsets, q, *ks, *vs, do, lse, di,
        # a part's gradient block is held, unwritten, while the key blocks are another part's: one core
        # walks all key blocks of a (row, head), so that it is not written back before it is computed
        axis2="arbitrary" if len(parts) > 1 else "parallel")
    return dq, tuple(grads[:len(parts)]), tuple(grads[len(parts):])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q, ks, vs, offsets, mask: Mask, blocks: Blocks):
    return _forward(q, ks, vs, offsets, mask, blocks, with_lse=False)[0]


def _attention_fwd(q, ks, vs, offsets, mask, blocks):
    o, lse = _forward(q, ks, vs, offsets, mask, blocks)
    return o, (q, ks, vs, offsets, o, lse)


def _attention_bwd(mask, blocks, saved, do):
    q, ks, vs, offsets, o, lse = saved
    dq, dks, dvs = _backward(q, ks, vs, offsets, o, lse, do, mask, blocks)
    return dq, dks, dvs, None


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
    blocks = blocks.for_pass(kind)
    bq, bk = fit(blocks.q, t, 8), fit(blocks.k, s, 8)
    ks, vs = [k], [v]
    if canvas is not None:
        if cache_size % bk or not cache_size:  # the canvas would start inside a block, or there is no cache
            ks, vs = [jnp.concatenate([k, canvas[0]], axis=2)], [jnp.concatenate([v, canvas[1]], axis=2)]
        else:
            ks, vs = [k, canvas[0]], [v, canvas[1]]
    tp, pad = round_up(t, bq), round_up(s, bk) - s
    ks[-1], vs[-1] = (jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0))) for x in (ks[-1], vs[-1]))  # whole blocks
    q = jnp.pad(q, ((0, 0), (0, tp - t), (0, 0), (0, 0))).transpose(0, 2, 1, 3).reshape(b, kh, n // kh, tp, d)
    o = _attention(q, tuple(ks), tuple(vs), offsets.astype(jnp.int32), Mask(kind, window, cache_size, s),
                   dataclasses.replace(blocks, q=bq, k=bk))  # [B, K, G, Tp, D]
    return o.reshape(b, n, tp, d).transpose(0, 2, 1, 3)[:, :t]
