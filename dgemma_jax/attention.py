"""Attention masks of the two passes and the attention back ends (``config.attention_impl``):
``xla`` (dense masks, einsums), ``pallas`` (``pallas_kernels.attention``: flash-style, masks
computed per block, each query block walks only the key blocks its mask reaches; Mosaic on TPU,
interpreted elsewhere; with its gradient) and ``pallas_gpu`` (``pallas_kernels.attention_gpu``: the
same walk; Triton on GPU, interpreted elsewhere; serving only). Both kernels read the canvas pass's
cache and canvas keys as two inputs.

Encoder pass (causal): a token at position p sees cache positions k <= p; on sliding layers also
k > p - window.

Canvas pass (bidirectional, read-only cache): every canvas token sees the whole canvas and the filled
cache positions k < length; on sliding layers only the last ``window - 1`` of them
(k >= length - window + 1), which is exactly what transformers' sliding-window cache keeps.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from dgemma_jax.sharding import RULES, logical_to_spec


def encoder_mask(positions: jax.Array, cache_size: int, window: int | None) -> jax.Array:
    """[B, T, S] bool: query at ``positions`` [B, T] may see cache slot s."""
    slots = jnp.arange(cache_size)[None, None, :]
    q = positions[:, :, None]
    mask = slots <= q
    if window is not None:
        mask &= slots > q - window
    return mask


def canvas_mask(length: jax.Array, cache_size: int, canvas_len: int, window: int | None) -> jax.Array:
    """[B, 1, S + L] bool: what every canvas token may see of ``concat(cache, canvas)``."""
    slots = jnp.arange(cache_size)[None, :]
    n = length[:, None]
    cached = slots < n
    if window is not None:
        cached &= slots >= n - (window - 1)
    canvas = jnp.ones((length.shape[0], canvas_len), bool)
    return jnp.concatenate([cached, canvas], axis=1)[:, None, :]


def heads_first(x: jax.Array) -> jax.Array:
    """[B, T, K, D] -> [B, K, T, D], the layout of keys and values (and of the KV cache)."""
    return x.transpose(0, 2, 1, 3)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention with scale 1.0 (q and k are RMS-normed), XLA.

    q [B, T, N, D], k/v [B, K, S, D] (N a multiple of K), mask [B, T or 1, S] -> [B, T, N, D].
    """
    b, t, n, d = q.shape
    kh = k.shape[1]
    qg = q.reshape(b, t, kh, n // kh, d)  # [B, T, K, G, D]
    scores = jnp.einsum("btkgd,bksd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksd->btkgd", probs, v)
    return out.reshape(b, t, n, d)


def _on_mesh(mesh, kernel, *args):
    """``kernel(*args)``; on a mesh under ``shard_map`` over the batch (Mosaic kernels must be, and
    Triton ones are single-device programs). Every arg has the batch first."""
    if mesh is None or mesh.size == 1:
        return kernel(*args)
    spec = logical_to_spec(("batch",), args[0].shape[:1], mesh, RULES)
    return jax.shard_map(kernel, mesh=mesh, in_specs=(spec,) * len(args), out_specs=spec, check_vma=False)(*args)


def _settings(blocks) -> dict:
    return {} if blocks is None else {"blocks": blocks}


def attend_causal(q, keys, values, start, window: int | None, impl: str = "xla", mesh: Mesh | None = None,
                  blocks=None):
    """Encoder pass: q [B, T, N, D] at positions ``start + t``, keys/values [B, K, S, D] (the cache,
    these tokens' K/V already written) -> [B, T, N, D]. ``blocks``: the kernel's block sizes
    (``Blocks`` for ``pallas``, ``GpuBlocks`` for ``pallas_gpu``; None = its defaults)."""
    if impl == "pallas":
        from pallas_kernels.attention import flash_attention

        kernel = functools.partial(flash_attention, kind="causal", window=window, **_settings(blocks))
        return _on_mesh(mesh, kernel, q, keys, values, start)
    if impl == "pallas_gpu":
        from pallas_kernels.attention_gpu import gpu_attention

        kernel = functools.partial(gpu_attention, kind="causal", window=window, **_settings(blocks))
        return _on_mesh(mesh, kernel, q, keys, values, start)
    positions = start[:, None] + jnp.arange(q.shape[1], dtype=jnp.int32)[None, :]
    return attend(q, keys, values, encoder_mask(positions, keys.shape[2], window))


def attend_canvas(q, keys, values, k, v, length, window: int | None, impl: str = "xla", mesh: Mesh | None = None,
                  blocks=None):
    """Canvas pass: q [B, L, N, D] and k/v [B, K, L, D] of the canvas over ``concat(cache keys/values
    [B, K, S, D], k/v)`` with ``length`` [B] filled cache slots -> [B, L, N, D]. The kernels
    (``pallas``, ``pallas_gpu``) read the cache and the canvas keys where they are, without the
    concatenation (a copy of the layer's whole cache on every pass)."""
    if impl in ("pallas", "pallas_gpu"):
        if impl == "pallas":
            from pallas_kernels.attention import flash_attention as attention
        else:
            from pallas_kernels.attention_gpu import gpu_attention as attention

        def kernel(q, keys, values, length, k, v):
            return attention(q, keys.astype(k.dtype), values.astype(v.dtype), length, kind="canvas", window=window,
                             canvas=(k, v), **_settings(blocks))

        return _on_mesh(mesh, kernel, q, keys, values, length, k, v)
    all_k = jnp.concatenate([keys.astype(k.dtype), k], axis=2)
    all_v = jnp.concatenate([values.astype(v.dtype), v], axis=2)
    return attend(q, all_k, all_v, canvas_mask(length, keys.shape[2], k.shape[2], window))
