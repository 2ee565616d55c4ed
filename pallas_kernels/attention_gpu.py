"""Flash-style masked attention for GPU: one Pallas kernel (Triton), ``interpret=True`` elsewhere.
Forward only (serving); training on GPU uses ``attention_impl="xla"``.

The masks are those of ``pallas_kernels.attention`` (``Mask``): ``causal`` for the encoder pass,
``canvas`` for the denoising pass. What this kernel does differently from the TPU one:

* Each program walks only the key blocks its mask can reach: a loop with run-time bounds from the
  row's offset (a sliding layer's canvas pass reads the last ``window - 1`` filled cache slots, not
  the whole cache), where the TPU grid visits every key block and skips the empty ones.
* The canvas pass takes the cache and the canvas keys as two inputs and walks one after the other,
  so the model does not concatenate ``cache | canvas`` (two copies of the cache per layer and pass).
* A program is a block of one query head's queries; it reads them and writes its output in the
  model's layout [B, T, N, D] (the block's rows N * D apart), so no transposes sit around it.

Against XLA's attention (``attend``), no float32 scores [B, N, T, S] or bf16 probabilities are
written and read back: in the 26B model's canvas pass at batch 16, 1.7 GB of traffic per sliding
layer (scores [128, 1280, 512] written once, read three times), where the kernel moves 0.23 GB.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.attention import MASKED, Mask
from pallas_kernels.common import pad_to, pallas_call, round_up


@dataclasses.dataclass(frozen=True)
class GpuBlocks:
    """Block sizes (powers of two, at least 16: Triton's dot) and Triton launch settings.

    ``q`` rows and ``k`` keys per block at head dim 256; at larger head dims both shrink in proportion
    (the 26B model's full layers, head dim 512, get half), so the float32 accumulator [q, D] and the
    key/value tiles keep their size. ``interpret``: None = the Triton kernel where the program is
    lowered for an NVIDIA GPU, interpreted elsewhere."""

    q: int = 64
    k: int = 64
    num_warps: int = 8
    num_stages: int = 2
    interpret: bool | None = None

    def sizes(self, d: int) -> tuple[int, int]:
        """-> (query block, key block) at head dim ``d`` (a power of two)."""
        shrink = max(1, d // 256)
        return max(16, self.q // shrink), max(16, self.k // shrink)


def _next_power_of_2(x: int) -> int:
    return max(16, int(pl.next_power_of_2(x)))


def _cache_range(mask: Mask, offset, t0, t1):
    """The cache slots [lo, hi) that query rows t0..t1-1 of a row with ``offset`` may see."""
    if mask.kind == "causal":  # slot <= offset + t, and with a window slot > offset + t - window
        lo = offset + t0 - mask.window + 1 if mask.window is not None else 0
        hi = offset + t1
    else:  # the filled slots below ``offset``, with a window only the last window - 1 of them
        lo = offset - (mask.window - 1) if mask.window is not None else 0
        hi = offset
    return jnp.clip(lo, 0, mask.cache_size), jnp.clip(hi, 0, mask.cache_size)


def _kernel(offsets_ref, q_ref, keys_ref, values_ref, *refs, mask: Mask, bq: int, bk: int, group: int,
            query_blocks: int, canvas_blocks: int):
    """One (batch row, key/value head, query head of its group x query block). q [B, Tp, N, D];
    refs: the canvas keys and values (canvas pass), then the output [B, Tp, N, D]."""
    canvas_refs, o_ref = refs[:-1], refs[-1]
    b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    offset = offsets_ref[b]
    head = h * group + i // query_blocks  # query heads h * G .. h * G + G - 1 share key/value head h
    t0 = (i % query_blocks) * bq  # the block's first query
    rows = pl.ds(pl.multiple_of(t0, bq), bq)
    q = q_ref[b, rows, head, :]  # [bq, D]
    t = t0 + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)

    def walk(keys_ref, values_ref, slot0: int, limit: int, first, stop, carry):
        """The online-softmax update with key blocks first..stop-1 of ``keys_ref``, which hold the
        slots ``slot0`` to ``limit - 1`` (its rows past those are padding)."""

        def body(j, carry):
            m, l, acc = carry  # running max [bq], sum [bq], output [bq, D], float32
            cols = pl.ds(pl.multiple_of(j * bk, bk), bk)
            k = keys_ref[b, h, cols, :].astype(q.dtype)  # [bk, D]
            s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
                                    precision=jax.lax.Precision.HIGHEST)  # [bq, bk]
            slot = slot0 + j * bk + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
            s = jnp.where(mask.visible(offset, t, slot) & (slot < limit), s, MASKED)
            m_new = jnp.maximum(m, jnp.max(s, axis=1))
            p = jnp.exp(s - m_new[:, None])
            alpha = jnp.exp(m - m_new)
            v = values_ref[b, h, cols, :].astype(q.dtype)
            pv = jnp.dot(p.astype(q.dtype), v, preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST)
            return m_new, alpha * l + jnp.sum(p, axis=1), alpha[:, None] * acc + pv

        return jax.lax.fori_loop(first, stop, body, carry)

    carry = (jnp.full((bq,), MASKED, jnp.float32), jnp.zeros((bq,), jnp.float32), jnp.zeros(q.shape, jnp.float32))
    lo, hi = _cache_range(mask, offset, t0, t0 + bq)
    carry = walk(keys_ref, values_ref, 0, mask.cache_size, lo // bk, (hi + bk - 1) // bk, carry)
    if canvas_refs:
        carry = walk(*canvas_refs, mask.cache_size, mask.num_keys, 0, canvas_blocks, carry)
    _, l, acc = carry
    # a row that sees no key (only padding rows can) has l = 0: write zeros
    o_ref[b, rows, head, :] = jnp.where(l[:, None] > 0, acc / l[:, None], 0.0).astype(o_ref.dtype)


def gpu_attention(q: jax.Array, keys: jax.Array, values: jax.Array, offsets: jax.Array, *, kind: str,
                  window: int | None = None, canvas: tuple[jax.Array, jax.Array] | None = None,
                  blocks: GpuBlocks = GpuBlocks()) -> jax.Array:
    """q [B, T, N, D]; keys/values [B, K, S, D] (the cache, heads first); offsets [B] int (causal:
    position of query 0; canvas: filled cache slots); ``canvas``: the canvas keys and values
    [B, K, L, D] (``kind="canvas"``), seen after the cache as slots S..S+L-1 -> [B, T, N, D] in q's dtype.
    """
    b, t, n, d = q.shape
    kh, s = keys.shape[1], keys.shape[2]
    if n % kh or values.shape != keys.shape or keys.shape[0] != b or keys.shape[3] != d:
        raise ValueError(f"gpu_attention: q {q.shape}, keys {keys.shape}, values {values.shape} do not fit "
                         "[B, T, N, D] / [B, K, S, D] with N a multiple of K")
    if (kind == "canvas") != (canvas is not None):
        raise ValueError(f"gpu_attention: kind={kind!r} {'needs' if kind == 'canvas' else 'takes no'} canvas keys")
    canvas_len = 0
    if canvas is not None:
        if canvas[0].shape != canvas[1].shape or canvas[0].shape[:2] != (b, kh) or canvas[0].shape[3] != d:
            raise ValueError(f"gpu_attention: canvas keys {canvas[0].shape} / values {canvas[1].shape} do not fit "
                             f"[B={b}, K={kh}, L, D={d}]")
        canvas_len = canvas[0].shape[2]
    group = n // kh
    dp = _next_power_of_2(d)  # Triton's blocks are powers of two; zero columns change no score
    bq, bk = blocks.sizes(dp)
    bq = min(bq, _next_power_of_2(t))
    bk = min(bk, _next_power_of_2(max(s, canvas_len)))
    tp = round_up(t, bq)
    mask = Mask(kind, window, s, s + canvas_len)
    qp = pad_to(q, {1: tp, 3: dp})  # [B, Tp, N, Dp]
    key_pad = lambda x: pad_to(x, {2: round_up(x.shape[2], bk), 3: dp})  # noqa: E731
    inputs = [key_pad(keys), key_pad(values)] + ([key_pad(canvas[0]), key_pad(canvas[1])] if canvas else [])
    kernel = functools.partial(_kernel, mask=mask, bq=bq, bk=bk, group=group, query_blocks=tp // bq,
                               canvas_blocks=round_up(canvas_len, bk) // bk)
    out = pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(qp.shape, q.dtype),
        grid=(b, kh, group * tp // bq),
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
        platform="cuda",
        interpret=blocks.interpret,
        name=f"flash_attention_{kind}",
    )(offsets.astype(jnp.int32), qp, *inputs)
    return out[:, :t, :, :d]
