"""The DiffusionGemma text backbone in Flax NNX.

One set of weights serves two passes:
  ``encode``: causal pass over new tokens (prompt or a committed canvas); writes their K/V into the
              preallocated cache and returns the final hidden states (whose logits are the AR head).
  ``denoise``: bidirectional pass over the canvas; attends to the cache and to itself, never writes
               the cache; returns float32 soft-capped logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dgemma_jax.attention import attend_canvas, attend_causal, heads_first
from dgemma_jax.cache import KVCache, write_rows
from dgemma_jax.config import SLIDING, ModelConfig
from dgemma_jax.layers import (Buffer, GatedMLP, RMSNorm, apply_rope, inverse_rms, param, project, rms_norm,
                               rope_frequencies)
from dgemma_jax.moe import MoE
from dgemma_jax.sharding import constrain

LOGITS_AXES = ("batch", None, "vocab")  # logical axes of the logits [B, T, V]


class Attention(nnx.Module):
    """q/k/v projections with q/k/v RMSNorm and RoPE. Full layers have no v_proj: V is the raw key
    projection, normed without scale (K = V)."""

    def __init__(self, config: ModelConfig, layer_type: str, *, rngs: nnx.Rngs, dtype=jnp.float32, mesh=None):
        h, n = config.hidden_size, config.num_heads
        d, kh = config.layer_head_dim(layer_type), config.layer_kv_heads(layer_type)
        self.config = config
        self.mesh = mesh  # the Pallas kernel runs under shard_map on it
        self.window = config.sliding_window if layer_type == SLIDING else None
        self.rope, self.head_dim = config.rope_for(layer_type), d  # static: frequencies are constants
        self.q_proj = param(rngs, (h, n, d), ("embed", "q_heads", "head_dim"), dtype)
        self.k_proj = param(rngs, (h, kh, d), ("embed", "kv_heads", "head_dim"), dtype)
        self.v_proj = param(rngs, (h, kh, d), ("embed", "kv_heads", "head_dim"), dtype) if self.window else None
        self.o_proj = param(rngs, (n, d, h), ("q_heads", "head_dim", "embed"), dtype)
        self.q_norm = RMSNorm(d, config.rms_norm_eps, rngs=rngs, dtype=dtype)
        self.k_norm = RMSNorm(d, config.rms_norm_eps, rngs=rngs, dtype=dtype)

    def qkv(self, x: jax.Array, positions: jax.Array):
        """x [B, T, H] -> q [B, T, N, D], k [B, K, T, D], v [B, K, T, D] (heads first, as the cache)."""
        q = project("bth,hnd->btnd", x, self.q_proj[...])
        k_raw = project("bth,hkd->btkd", x, self.k_proj[...])
        v_raw = k_raw if self.v_proj is None else project("bth,hkd->btkd", x, self.v_proj[...])
        inv_freq = rope_frequencies(self.rope, self.head_dim)
        # every head's RMS in one reduction (full layers: V is K's raw projection, the same RMS)
        q_rms, k_rms, *v_rms = inverse_rms([q, k_raw] + ([] if self.v_proj is None else [v_raw]),
                                           self.config.rms_norm_eps)
        q = apply_rope(self.q_norm(q, q_rms), positions, inv_freq)
        k = apply_rope(self.k_norm(k_raw, k_rms), positions, inv_freq)
        v = rms_norm(v_raw, None, self.config.rms_norm_eps, v_rms[0] if v_rms else k_rms)
        return q, heads_first(k), heads_first(v)

    def out(self, o: jax.Array) -> jax.Array:
        return project("btnd,ndh->bth", o, self.o_proj[...])

    def encode(self, x, positions, keys, values, start):
        """Causal pass. Writes K/V at ``start`` [B]; returns (output, keys, values)."""
        q, k, v = self.qkv(x, positions)
        keys, values = write_rows(keys, k, start), write_rows(values, v, start)
        o = attend_causal(q, keys, values, start, self.window, self.config.attention_impl, self.mesh)
        return self.out(o), keys, values

    def denoise(self, x, positions, keys, values, length):
        """Bidirectional canvas pass over ``concat(cache, canvas)``; the cache is not modified."""
        q, k, v = self.qkv(x, positions)
        return self.out(attend_canvas(q, keys, values, k, v, length, self.window, self.config.attention_impl, self.mesh))


class Block(nnx.Module):
    """Attention, then dense MLP and MoE side by side, each with its own norms; ``layer_scalar``."""

    def __init__(self, config: ModelConfig, layer_type: str, *, rngs: nnx.Rngs, dtype=jnp.float32, mesh=None):
        h, eps = config.hidden_size, config.rms_norm_eps

        def norm():
            return RMSNorm(h, eps, rngs=rngs, dtype=dtype)

        self.attn = Attention(config, layer_type, rngs=rngs, dtype=dtype, mesh=mesh)
        self.input_norm, self.post_attn_norm = norm(), norm()
        self.mlp = GatedMLP(config, rngs=rngs, dtype=dtype)
        self.moe = MoE(config, rngs=rngs, dtype=dtype, mesh=mesh)
        self.pre_mlp_norm, self.post_mlp_norm = norm(), norm()  # dense MLP
        self.pre_moe_norm, self.post_moe_norm = norm(), norm()  # experts
        self.post_ffw_norm = norm()  # after the sum
        self.layer_scalar = param(rngs, (1,), (None,), dtype, init="ones", kind=Buffer)

    def feed_forward(self, x: jax.Array) -> jax.Array:
        dense = self.post_mlp_norm(self.mlp(self.pre_mlp_norm(x)))
        experts = self.moe(x, self.pre_moe_norm(x))  # [B, T, H]
        return x + self.post_ffw_norm(dense + self.post_moe_norm(experts))

    def encode(self, x, positions, keys, values, start):
        a, keys, values = self.attn.encode(self.input_norm(x), positions, keys, values, start)
        x = x + self.post_attn_norm(a)
        return self.feed_forward(x) * self.layer_scalar[...], keys, values

    def denoise(self, x, positions, keys, values, length):
        x = x + self.post_attn_norm(self.attn.denoise(self.input_norm(x), positions, keys, values, length))
        return self.feed_forward(x) * self.layer_scalar[...]


class SelfConditioning(nnx.Module):
    """post_norm(canvas_embeddings + MLP(pre_norm(soft_embeddings))); post_norm has no scale."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.pre_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, rngs=rngs, dtype=dtype)
        self.mlp = GatedMLP(config, rngs=rngs, dtype=dtype)
        self.post_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, rngs=rngs, dtype=dtype, with_scale=False)

    def __call__(self, embeddings: jax.Array, soft_embeddings: jax.Array) -> jax.Array:
        return self.post_norm(embeddings + self.mlp(self.pre_norm(soft_embeddings)))


class DiffusionGemma(nnx.Module):
    """The text backbone. Build with ``DiffusionGemma(config, rngs=nnx.Rngs(0))``. ``mesh``: the
    mesh the parameters live on; the MoE layers run expert-parallel over it, and the logits are
    split over its vocabulary axes."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, mesh=None):
        self.config = config
        self.mesh = mesh
        self.embedding = param(rngs, (config.vocab_size, config.hidden_size), ("vocab", "embed"), dtype)
        self.layers = nnx.List([Block(config, lt, rngs=rngs, dtype=dtype, mesh=mesh) for lt in config.layer_types])
        self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, rngs=rngs, dtype=dtype)
        self.self_conditioning = SelfConditioning(config, rngs=rngs, dtype=dtype)

    @property
    def dtype(self):
        return self.embedding[...].dtype

    def _layer_fn(self, method: str):
        """``Block.encode`` / ``Block.denoise``; with ``config.remat`` under ``jax.checkpoint`` (the
        layer's activations are recomputed in the backward pass instead of stored). The blocks are
        pure functions of their weights, so the functional split/merge is exact."""
        fn = getattr(Block, method)
        if not self.config.remat:
            return fn

        def rematerialised(layer: Block, *args):
            graphdef, state = nnx.split(layer)
            return jax.checkpoint(lambda state, *a: fn(nnx.merge(graphdef, state), *a))(state, *args)

        return rematerialised

    def embed(self, tokens: jax.Array) -> jax.Array:
        """tokens [B, T] -> [B, T, H], scaled by sqrt(hidden) rounded to the weight dtype."""
        table = self.embedding[...]
        return table[tokens] * jnp.asarray(self.config.embed_scale, table.dtype)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final hidden states [B, T, H] -> float32 soft-capped logits [B, T, V] (tied LM head)."""
        logits = constrain((hidden @ self.embedding[...].T).astype(jnp.float32), LOGITS_AXES, self.mesh)
        cap = self.config.final_logit_softcap
        return logits if cap is None else jnp.tanh(logits / cap) * cap

    def encode(self, tokens: jax.Array, cache: KVCache, num_valid: jax.Array | None = None):
        """Causal pass over ``tokens`` [B, T] placed after each row's cached tokens.

        ``num_valid`` [B] (default T): how many leading tokens of each row are real; the rest are
        padding whose K/V are written but not counted, so the next write overwrites them.
        Returns (final hidden states [B, T, H], updated cache).
        """
        b, t = tokens.shape
        if num_valid is None:
            num_valid = jnp.full((b,), t, jnp.int32)
        positions = cache.length[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        x = self.embed(tokens)
        keys, values = list(cache.keys), list(cache.values)
        for i, layer in enumerate(self.layers):
            x, keys[i], values[i] = self._layer_fn("encode")(layer, x, positions, keys[i], values[i], cache.length)
        new_cache = KVCache(tuple(keys), tuple(values), cache.length + num_valid.astype(jnp.int32))
        return self.final_norm(x), new_cache

    def soft_embeddings(self, logits: jax.Array) -> jax.Array:
        """softmax(logits) @ embedding * embed scale: [B, L, V] -> [B, L, H]."""
        table = self.embedding[...]
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(table.dtype)
        return (probs @ table) * jnp.asarray(self.config.embed_scale, table.dtype)

    def denoise(self, canvas: jax.Array, cache: KVCache, self_conditioning_logits: jax.Array | None = None,
                self_conditioning_mask: jax.Array | None = None):
        """Bidirectional pass over ``canvas`` [B, L] -> float32 logits [B, L, V]. Reads the cache only.

        ``self_conditioning_logits`` [B, L, V]: the previous step's logits, or None for a zero signal.
        ``self_conditioning_mask`` [B] bool: rows where it is False get exactly zero signal (as if no
        logits were given), so one compiled step serves first and later denoising steps alike.
        """
        return self.logits(self.denoise_hidden(canvas, cache, self_conditioning_logits, self_conditioning_mask))

    def denoise_hidden(self, canvas: jax.Array, cache: KVCache, self_conditioning_logits: jax.Array | None = None,
                       self_conditioning_mask: jax.Array | None = None):
        """``denoise`` without its logits head: the final (normed) hidden states [B, L, H]."""
        x = self.embed(canvas)
        if self_conditioning_logits is None:
            soft = jnp.zeros_like(x)
        else:
            soft = self.soft_embeddings(self_conditioning_logits)
            if self_conditioning_mask is not None:
                soft = jnp.where(self_conditioning_mask[:, None, None], soft, jnp.zeros_like(soft))
        x = self.self_conditioning(x, soft)
        positions = cache.length[:, None] + jnp.arange(canvas.shape[1], dtype=jnp.int32)[None, :]
        for i, layer in enumerate(self.layers):
            x = self._layer_fn("denoise")(layer, x, positions, cache.keys[i], cache.values[i], cache.length)
        return self.final_norm(x)
