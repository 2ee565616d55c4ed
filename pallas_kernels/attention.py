"""Flash-style masked attention for DiffusionGemma's two passes: Pallas kernels for TPU (Mosaic),
``interpret=True`` elsewhere. Forward with an online softmax, backward (dq; dk/dv) recomputing the
probabilities from the saved log-sum-exp, all behind a custom VJP.

Masks (never materialised; each (query block, key block) pair that the mask leaves empty is skipped):

* ``causal`` (encoder pass): the queries of row ``b`` sit at positions ``offsets[b] + t``; a query
  at position ``p`` sees key slot ``s <= p``, and with a ``window`` only ``s > p - window``.
* ``canvas`` (denoising pass, keys = ``cache (cache_size slots) | canvas``): every query sees the
  whole canvas and the filled cache slots ``s < offsets[b]`` (KV-length masking of a partly filled
  cache); with a ``window`` only the last ``window - 1`` of them. Without a window this is full
  attention over the filled cache and the canvas.

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
    """One block of masked scores, float32 [bq, bk]."""
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    t = qi * bq + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    slot = ki * bk + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    return jnp.where(mask.visible(offset, t, slot), s, MASKED)


def _forward_kernel(offsets, q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, *, mask: Mask, bq: int,
                    bk: int):
    b, qi, ki = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    offset = offsets[b]

    @pl.when(ki == 0)
    def _():
        m_sc[...] = jnp.full_like(m_sc, -jnp.inf)
        l_sc[...] = jnp.zeros_like(l_sc)
        acc_sc[...] = jnp.zeros_like(acc_sc)

    @pl.when(mask.block_visible(offset, qi * bq, (qi + 1) * bq, ki * bk, (ki + 1) * bk))
    def _():
        s = _scores(mask, offset, q_ref[...], k_ref[...], qi, ki, bq, bk)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))  # [bq, 1]
        p = jnp.exp(s - m_new)
        alpha = jnp.exp(m_prev - m_new)
        l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
        v = v_ref[...]
        acc_sc[...] = alpha * acc_sc[...] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        m_sc[...] = m_new

    @pl.when(ki == pl.num_programs(3) - 1)
    def _():
        o_ref[...] = (acc_sc[...] / l_sc[...]).astype(o_ref.dtype)
        lse_ref[...] = m_sc[...] + jnp.log(l_sc[...])


def _probs(mask, offset, q, k, lse, qi, ki, bq, bk):
    return jnp.exp(_scores(mask, offset, q, k, qi, ki, bq, bk) - lse)  # [bq, bk]; masked -> 0


def _dq_kernel(offsets, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, dq_ref, dq_sc, *, mask: Mask, bq: int,
               bk: int):
    b, qi, ki = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    offset = offsets[b]

    @pl.when(ki == 0)
    def _():
        dq_sc[...] = jnp.zeros_like(dq_sc)

    @pl.when(mask.block_visible(offset, qi * bq, (qi + 1) * bq, ki * bk, (ki + 1) * bk))
    def _():
        k = k_ref[...]
        p = _probs(mask, offset, q_ref[...], k, lse_ref[...], qi, ki, bq, bk)
        dp = jax.lax.dot_general(do_ref[...], v_ref[...], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        ds = p * (dp - di_ref[...])
        dq_sc[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    @pl.when(ki == pl.num_programs(3) - 1)
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
    for a grid (b, n, <query block>, <key block>) given as index functions."""
    def q_spec(qi_of):
        return pl.BlockSpec((None, None, bq, d), lambda b, n, i, j, *_: (b, n, qi_of(i, j), 0))

    def k_spec(ki_of):
        return pl.BlockSpec((None, None, bk, d), lambda b, n, i, j, *_: (b, n // group, ki_of(i, j), 0))

    def row_spec(qi_of):
        return pl.BlockSpec((None, None, bq, 1), lambda b, n, i, j, *_: (b, n, qi_of(i, j), 0))

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


def _forward(q, k, v, offsets, mask: Mask, blocks: Blocks):
    """q [B, N, Tp, D], k/v [B, K, Sp, D] (padded to whole blocks) -> (o [B, N, Tp, D], lse [B, N, Tp, 1])."""
    b, n, t, d = q.shape
    s, group = k.shape[2], n // k.shape[1]
    bq, bk = blocks.q, blocks.k
    q_spec, k_spec, row_spec = _specs(bq, bk, d, group)
    first, second = (lambda i, j: i), (lambda i, j: j)
    return _call(
        functools.partial(_forward_kernel, mask=mask, bq=bq, bk=bk), (b, n, t // bq, s // bk),
        [q_spec(first), k_spec(second), k_spec(second)], [q_spec(first), row_spec(first)],
        [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, n, t, 1), jnp.float32)],
        [pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, d), jnp.float32)],
        blocks, "flash_attention_fwd", offsets, q, k, v)


def _backward(q, k, v, offsets, o, lse, do, mask: Mask, blocks: Blocks):
    b, n, t, d = q.shape
    kh, s = k.shape[1], k.shape[2]
    group = n // kh
    bq, bk = blocks.q, blocks.k
    di = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1, keepdims=True)  # [B, N, T, 1]
    q_spec, k_spec, row_spec = _specs(bq, bk, d, group)
    first, second = (lambda i, j: i), (lambda i, j: j)
    dq = _call(
        functools.partial(_dq_kernel, mask=mask, bq=bq, bk=bk), (b, n, t // bq, s // bk),
        [q_spec(first), k_spec(second), k_spec(second), q_spec(first), row_spec(first), row_spec(first)],
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
def _attention(q, k, v, offsets, mask: Mask, blocks: Blocks):
    return _forward(q, k, v, offsets, mask, blocks)[0]


def _attention_fwd(q, k, v, offsets, mask, blocks):
    o, lse = _forward(q, k, v, offsets, mask, blocks)
    return o, (q, k, v, offsets, o, lse)


def _attention_bwd(mask, blocks, saved, do):
    q, k, v, offsets, o, lse = saved
    dq, dk, dv = _backward(q, k, v, offsets, o, lse, do, mask, blocks)
    return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, offsets: jax.Array, *, kind: str,
                    window: int | None = None, cache_size: int = 0, blocks: Blocks = Blocks()) -> jax.Array:
    """q [B, T, N, D], k/v [B, K, S, D] (heads first, as the KV cache), offsets [B] int (causal:
    position of query 0; canvas: filled cache slots) -> [B, T, N, D]. Differentiable in q, k and v."""
    b, t, n, d = q.shape
    kh, s = k.shape[1], k.shape[2]
    if n % kh or v.shape != k.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"flash_attention: q {q.shape}, k {k.shape}, v {v.shape} do not fit [B, T, N, D] / "
                         f"[B, K, S, D] with N a multiple of K")
    if kind == "canvas" and not 0 <= cache_size <= s:
        raise ValueError(f"flash_attention: cache_size={cache_size} outside the {s} keys")
    bq, bk = fit(blocks.q, t, 8), fit(blocks.k, s, 8)
    tp, sp = round_up(t, bq), round_up(s, bk)
    mask = Mask(kind, window, cache_size, s)
    pad_keys = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, sp - s), (0, 0)))  # noqa: E731
    q = jnp.pad(q, ((0, 0), (0, tp - t), (0, 0), (0, 0))).transpose(0, 2, 1, 3)  # [B, N, Tp, D]
    o = _attention(q, pad_keys(k), pad_keys(v), offsets.astype(jnp.int32), mask,
                   dataclasses.replace(blocks, q=bq, k=bk))
    return o.transpose(0, 2, 1, 3)[:, :t]
