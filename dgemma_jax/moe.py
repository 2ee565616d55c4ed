"""Mixture of experts: the exact router and the expert computation behind one interface.

Back ends (``config.moe_impl``); the first two compute only the chosen experts:
  ``ragged``: tokens sorted by expert, grouped matmuls with ``jax.lax.ragged_dot`` (native on GPU and
              TPU; XLA:CPU lowers it to a masked dense product over all experts).
  ``tiled``:  tokens sorted by expert into tiles of one expert each; a loop over experts runs small
              matmuls over that expert's filled tiles only. The CPU back end (inference: its loops
              have data-dependent trip counts, so it has no reverse-mode gradient).
  ``auto``:   ``tiled`` on CPU, ``ragged`` elsewhere.
  ``dense``:  every token through every expert, weighted by the (mostly zero) gate matrix. A test
              reference, and the CPU training back end (XLA:CPU's ``ragged_dot`` gradient is slower).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dgemma_jax.config import ModelConfig
from dgemma_jax.layers import param, rms_norm


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


class MoE(nnx.Module):
    """Router + ``num_experts`` gated-GELU experts of width ``moe_intermediate_size``."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        e, h, i = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.config = config
        self.router_proj = param(rngs, (h, e), ("embed", None), dtype)
        self.router_scale = param(rngs, (h,), (None,), dtype, init="ones")
        self.per_expert_scale = param(rngs, (e,), (None,), dtype, init="ones")
        self.gate = param(rngs, (e, h, i), ("expert", "embed", "moe_mlp"), dtype)
        self.up = param(rngs, (e, h, i), ("expert", "embed", "moe_mlp"), dtype)
        self.down = param(rngs, (e, i, h), ("expert", "moe_mlp", "embed"), dtype)

    def route(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [N, H] (the residual stream) -> (weights [N, K] f32, expert ids [N, K] int32)."""
        h = self.config.hidden_size
        z = rms_norm(x, None, self.config.rms_norm_eps) * self.router_scale[...] * (h**-0.5)
        scores = z @ self.router_proj[...]  # [N, E]
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)
        top_w, top_i = jax.lax.top_k(probs, self.config.num_experts_per_tok)
        top_w = top_w / jnp.sum(top_w, axis=-1, keepdims=True)
        top_w = top_w * self.per_expert_scale[...][top_i].astype(jnp.float32)
        return top_w, top_i

    def __call__(self, x_route: jax.Array, x_expert: jax.Array) -> jax.Array:
        """x_route [N, H] picks the experts, x_expert [N, H] goes through them -> [N, H]."""
        weights, ids = self.route(x_route)
        impl = self.config.moe_impl
        if impl == "auto":
            impl = "tiled" if jax.default_backend() == "cpu" else "ragged"
        out = {"dense": self._dense, "tiled": self._tiled, "ragged": self._ragged}[impl](x_expert, weights, ids)
        return out.astype(x_expert.dtype)

    def _sort_by_expert(self, ids: jax.Array):
        """ids [N, K] -> (order [N*K] assignments grouped by expert, their token [N*K], group sizes [E])."""
        flat_ids = ids.reshape(-1)
        order = jnp.argsort(flat_ids, stable=True)
        sizes = jnp.bincount(flat_ids, length=self.config.num_experts).astype(jnp.int32)
        return order, order // ids.shape[1], sizes

    @staticmethod
    def _combine(y: jax.Array, weights: jax.Array, order: jax.Array, token: jax.Array, n: int) -> jax.Array:
        """Expert outputs y [N*K, H] in sorted order -> gate-weighted sum per token, float32 [N, H]."""
        y = y.astype(jnp.float32) * weights.reshape(-1)[order][:, None]
        return jnp.zeros((n, y.shape[1]), jnp.float32).at[token].add(y)

    def _tiled(self, x: jax.Array, weights: jax.Array, ids: jax.Array) -> jax.Array:
        n, k = ids.shape
        e = self.config.num_experts
        tile = int(min(128, max(8, _next_pow2(n * k // e))))
        order, token, sizes = self._sort_by_expert(ids)
        sorted_ids = ids.reshape(-1)[order]
        tiles = -(-sizes // tile)  # [E] tiles per expert; each group padded to whole tiles
        first_tile = jnp.cumsum(tiles) - tiles
        rank = jnp.arange(n * k) - (jnp.cumsum(sizes) - sizes)[sorted_ids]
        dest = first_tile[sorted_ids] * tile + rank  # [N*K] row of each assignment in the tiled layout
        max_rows = -(-(n * k + e * (tile - 1)) // tile) * tile
        xs = jnp.zeros((max_rows, x.shape[1]), x.dtype).at[dest].set(x[token])

        def per_expert(i, ys):
            gate, up, down = self.gate[i], self.up[i], self.down[i]  # sliced once per expert

            def per_tile(t, ys):
                rows = jax.lax.dynamic_slice_in_dim(xs, t * tile, tile)
                y = (gelu_tanh(rows @ gate) * (rows @ up)) @ down
                return jax.lax.dynamic_update_slice_in_dim(ys, y, t * tile, axis=0)

            return jax.lax.fori_loop(first_tile[i], first_tile[i] + tiles[i], per_tile, ys)

        ys = jax.lax.fori_loop(0, e, per_expert, jnp.zeros_like(xs))
        return self._combine(ys[dest], weights, order, token, n)

    def _ragged(self, x: jax.Array, weights: jax.Array, ids: jax.Array) -> jax.Array:
        order, token, sizes = self._sort_by_expert(ids)
        xs = x[token]  # [N*K, H]
        g = jax.lax.ragged_dot(xs, self.gate[...], sizes)
        u = jax.lax.ragged_dot(xs, self.up[...], sizes)
        y = jax.lax.ragged_dot(gelu_tanh(g) * u, self.down[...], sizes)  # [N*K, H]
        return self._combine(y, weights, order, token, ids.shape[0])

    def _dense(self, x: jax.Array, weights: jax.Array, ids: jax.Array) -> jax.Array:
        gates = jnp.zeros((x.shape[0], self.config.num_experts), jnp.float32)
        gates = gates.at[jnp.arange(x.shape[0])[:, None], ids].add(weights)  # [N, E]
        g = jnp.einsum("nh,ehi->eni", x, self.gate[...])
        u = jnp.einsum("nh,ehi->eni", x, self.up[...])
        y = jnp.einsum("eni,eih->enh", gelu_tanh(g) * u, self.down[...])
        return jnp.einsum("enh,ne->nh", y.astype(jnp.float32), gates)
