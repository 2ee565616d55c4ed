"""Attention masks of the two passes and the attention back ends.

Encoder pass (causal): a token at position p sees cache positions k <= p; on sliding layers also
k > p - window.

Canvas pass (bidirectional, read-only cache): every canvas token sees the whole canvas and the filled
cache positions k < length; on sliding layers only the last ``window - 1`` of them
(k >= length - window + 1), which is exactly what transformers' sliding-window cache keeps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, impl: str = "xla") -> jax.Array:
    """Grouped-query attention with scale 1.0 (q and k are RMS-normed).

    q [B, T, N, D], k/v [B, S, K, D] (N a multiple of K), mask [B, T or 1, S] -> [B, T, N, D].
    """
    if impl != "xla":
        raise ValueError(f"attention_impl={impl!r} is not available")
    b, t, n, d = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, n // kh, d)  # [B, T, K, G, D]
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, n, d)
