"""The preallocated, fixed-size KV cache written by the encoder pass and read by the canvas pass."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dgemma_jax.config import ModelConfig


KEY_BLOCK = 256  # slots: a multiple of the attention kernels' key blocks (TPU: 256, GPU: 64 or 32)


def cache_capacity(config: ModelConfig, positions: int) -> int:
    """Cache slots for ``positions`` tokens. With an attention kernel (``attention_impl`` ``pallas``
    or ``pallas_gpu``) rounded up to whole ``KEY_BLOCK`` blocks: the kernels take such a cache as it
    is (one that ends inside a key block is padded, on TPU in the canvas pass also concatenated with
    the canvas keys: a copy of every layer's cache on every pass), and never visit the slots past
    the tokens. XLA's attention attends over every slot, so it gets exactly ``positions``."""
    if config.attention_impl in ("pallas", "pallas_gpu"):
        return -(-positions // KEY_BLOCK) * KEY_BLOCK
    return positions


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of every layer, plus how many positions of each row are filled.

    ``keys[i]`` / ``values[i]``: ``[B, kv_heads_i, S, head_dim_i]`` (post-norm, post-RoPE keys;
    normed values), heads before positions as the attention kernels read them (and as transformers
    stores them), so no layout change of the cache is needed around a denoising loop. Row ``b`` holds
    its tokens at positions ``0 .. length[b]-1``; entries at and past ``length[b]`` are garbage and
    always masked.
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    length: jax.Array  # [B] int32

    @property
    def size(self) -> int:
        """S, the number of positions the cache can hold."""
        return self.keys[0].shape[2]

    @classmethod
    def create(cls, config: ModelConfig, batch: int, size: int, dtype=jnp.float32) -> "KVCache":
        """An empty cache of ``size`` positions for ``batch`` rows."""
        shapes = [(batch, config.layer_kv_heads(lt), size, config.layer_head_dim(lt)) for lt in config.layer_types]
        return cls(
            keys=tuple(jnp.zeros(s, dtype) for s in shapes),
            values=tuple(jnp.zeros(s, dtype) for s in shapes),
            length=jnp.zeros((batch,), jnp.int32),
        )

    @classmethod
    def for_positions(cls, config: ModelConfig, batch: int, positions: int, dtype=jnp.float32) -> "KVCache":
        """An empty cache for ``positions`` tokens per row: ``cache_capacity(config, positions)``
        slots (whole key blocks when an attention kernel runs)."""
        return cls.create(config, batch, cache_capacity(config, positions), dtype)


def write_rows(buffer: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """Writes ``new`` [B, K, T, D] into ``buffer`` [B, K, S, D] at per-row positions ``start`` [B]."""

    def one(buf, x, s):
        return jax.lax.dynamic_update_slice_in_dim(buf, x.astype(buf.dtype), s, axis=1)

    return jax.vmap(one)(buffer, new, start)
