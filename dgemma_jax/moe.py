"""Mixture of experts: the exact router and the expert computation behind one interface.

Back ends (``config.moe_impl``); all but ``dense`` compute only the chosen experts:
  ``ragged``: tokens sorted by expert, grouped matmuls with ``jax.lax.ragged_dot`` (native on GPU and
              TPU; XLA:CPU lowers it to a masked dense product over all experts).
  ``pallas``: the same with the Pallas grouped matmul of ``pallas_kernels.grouped_matmul`` (Mosaic on
              TPU, interpreted elsewhere; it has a custom VJP for training).
  ``pallas_gpu``: tokens sorted by expert through the two Pallas kernels (Triton on GPU, interpreted
              elsewhere) of ``pallas_kernels.expert_ffn``: gate/up with the GELU product fused in,
              then down; each expert's weights read once per row tile, int8 converted in registers.
              The kernels gather the tokens and store their rows in token order themselves, so
              the combine is a sum over each token's K rows. Forward only (serving). Not yet timed
              on a GPU, so not the GPU default.
  ``tiled``:  tokens sorted by expert into tiles of one expert each; a loop over experts runs small
              matmuls over that expert's filled tiles only. The CPU back end (inference: its loops
              have data-dependent trip counts, so it has no reverse-mode gradient).
  ``bucketed``: the capacity-bucketed batched einsum. Tokens sorted by expert are laid out as
              [E, C, H] with C the smallest power of two (from 8) that holds the largest group; one
              compiled branch per C, picked at run time (``lax.switch``), so no token is ever dropped.
  ``dense``:  every token through every expert, weighted by the (mostly zero) gate matrix. A test
              reference, and the CPU training back end (XLA:CPU's ``ragged_dot`` gradient is slower).
  ``auto``:   ``pallas`` on TPU, ``bucketed`` on GPU, ``tiled`` on CPU. On an H100 (jax 0.11.2,
              ``bench/moe.py``, one 26B layer, bf16) ``bucketed`` ran 1.07 / 1.33 / 3.23 ms at
              256 / 1,024 / 4,096 tokens, ``ragged`` 5.2 / 21.4 / 81.7 and ``tiled`` 9.6 / 10.7 / 18.0.

Weights: ``ExpertWeights``, either the float experts or int8 experts with per-output-channel float32
scales (``dgemma_jax.quant``; serving). Every back end applies a scale after its product, so the int8
weights are read as int8.

Expert parallelism: on a mesh, the layer runs under ``shard_map``. Each device holds the experts of
its ``expert`` shard; the tokens are gathered over ``expert`` (all-gather), every device routes them
all and computes its own experts' share (an assignment to another shard's expert contributes zero),
and the shares are summed back with a reduce-scatter over ``expert`` (a plain sum when the tokens
are not split over ``expert``). Inside, the weights are whole on the ``fsdp``/``tensor`` axes.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

from dgemma_jax.config import ModelConfig
from dgemma_jax.layers import param, rms_norm, whole
from dgemma_jax.sharding import RULES, logical_to_spec

EXPERT_AXIS = "expert"


class ExpertWeights(NamedTuple):
    """One layer's (or one shard's) experts: gate, up [E, H, I] and down [E, I, H], float; or int8
    with per-output-channel float32 scales gate_scale, up_scale [E, I] and down_scale [E, H]."""

    gate: jax.Array
    up: jax.Array
    down: jax.Array
    gate_scale: jax.Array | None = None
    up_scale: jax.Array | None = None
    down_scale: jax.Array | None = None


def _scaled(y: jax.Array, scale: jax.Array | None) -> jax.Array:
    """y times the per-output-channel scale of int8 weights (broadcast over y's rows); y if float."""
    return y if scale is None else (y * scale).astype(y.dtype)


def _ffn(rows: jax.Array, mm, w: ExpertWeights) -> jax.Array:
    """gelu_tanh(rows @ gate) * (rows @ up) @ down, each product ``mm(rows, weight, scale)``."""
    return mm(gelu_tanh(mm(rows, w.gate, w.gate_scale)) * mm(rows, w.up, w.up_scale), w.down, w.down_scale)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


def resolve_impl(impl: str, platform: str | None = None) -> str:
    """``auto`` -> the back end for ``platform`` (default: the default backend's)."""
    if impl != "auto":
        return impl
    return {"tpu": "pallas", "gpu": "bucketed"}.get(platform or jax.default_backend(), "tiled")


def route(x: jax.Array, proj: jax.Array, scale: jax.Array, expert_scale: jax.Array, top_k: int, eps: float):
    """x [N, H] (the residual stream) -> (weights [N, K] f32, expert ids [N, K] int32)."""
    h = x.shape[-1]
    z = rms_norm(x, None, eps) * scale * (h**-0.5)
    probs = jax.nn.softmax((z @ proj).astype(jnp.float32), axis=-1)  # [N, E]
    top_w, top_i = jax.lax.top_k(probs, top_k)
    top_w = top_w / jnp.sum(top_w, axis=-1, keepdims=True)
    return top_w * expert_scale[top_i].astype(jnp.float32), top_i


def _sort_by_expert(key: jax.Array, num_local: int):
    """key [N, K]: local expert, or ``num_local`` for an assignment to another shard's expert ->
    (order [N*K] grouped by key, token of each [N*K], sorted keys [N*K], group sizes [num_local]).
    Other shards' assignments sort last, after every local group."""
    flat = key.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    # counted by compare-and-sum, one fusion: a bincount scatters into a zeroed buffer, which XLA
    # hoists out of the denoising loop and then copies back in on every pass
    sizes = jnp.sum(jnp.arange(num_local, dtype=flat.dtype)[:, None] == flat, axis=1, dtype=jnp.int32)
    return order, order // key.shape[1], flat[order], sizes


def _combine(y: jax.Array, weights: jax.Array, order: jax.Array, token: jax.Array, n: int) -> jax.Array:
    """Expert outputs y [N*K, H] in sorted order -> gate-weighted sum per token, float32 [N, H]."""
    y = y.astype(jnp.float32) * weights.reshape(-1)[order][:, None]
    return jnp.zeros((n, y.shape[1]), jnp.float32).at[token].add(y)


def _grouped(matmul):
    """A back end from a grouped matmul ``(rows [M, H], weights [E, H, I], group sizes [E]) -> [M, I]``
    over rows sorted by expert; rows after the last local group come out zero."""

    def experts(x, weights, key, w: ExpertWeights):
        e = w.gate.shape[0]
        order, token, sorted_key, sizes = _sort_by_expert(key, e)
        at = jnp.minimum(sorted_key, e - 1)  # [N*K] each sorted row's expert (other shards' rows are zero)

        def mm(rows, weight, scale):
            return _scaled(matmul(rows, weight, sizes), None if scale is None else scale[at])

        y = _ffn(x[token], mm, w)  # [N*K, H]
        return _combine(y, weights, order, token, x.shape[0])

    return experts


def _pallas_matmul(lhs, rhs, sizes):
    from pallas_kernels.grouped_matmul import grouped_matmul

    return grouped_matmul(lhs, rhs, sizes, 0)


def _mm_local(rows, weight, scale):
    """rows [M, H] @ one expert's weight [H, O] (int8 read as int8, converted in the product)."""
    return _scaled(rows @ weight.astype(rows.dtype), scale)


def _tiled(x, weights, key, w: ExpertWeights):
    n, k = key.shape
    e = w.gate.shape[0]
    tile = int(min(128, max(8, _next_pow2(n * k // e))))
    order, token, sorted_key, sizes = _sort_by_expert(key, e)
    tiles = -(-sizes // tile)  # [E] tiles per expert; each group padded to whole tiles
    first_tile = jnp.cumsum(tiles) - tiles
    local = sorted_key < e
    at = jnp.minimum(sorted_key, e - 1)
    rank = jnp.arange(n * k) - (jnp.cumsum(sizes) - sizes)[at]
    max_rows = -(-(n * k + e * (tile - 1)) // tile) * tile
    dest = jnp.where(local, first_tile[at] * tile + rank, max_rows)  # [N*K] row in the tiled layout
    xs = jnp.zeros((max_rows, x.shape[1]), x.dtype).at[dest].set(x[token], mode="drop")

    def per_expert(i, ys):
        w_i = jax.tree.map(lambda a: a[i], w)  # sliced once per expert

        def per_tile(t, ys):
            rows = jax.lax.dynamic_slice_in_dim(xs, t * tile, tile)
            y = _ffn(rows, _mm_local, w_i)
            return jax.lax.dynamic_update_slice_in_dim(ys, y, t * tile, axis=0)

        return jax.lax.fori_loop(first_tile[i], first_tile[i] + tiles[i], per_tile, ys)

    ys = jax.lax.fori_loop(0, e, per_expert, jnp.zeros_like(xs))
    y = jnp.take(ys, dest, axis=0, mode="fill", fill_value=0)
    return _combine(y, weights, order, token, n)


def _mm_batched(rows, weight, scale):
    """rows [N, H] (every expert's input) or [E, C, H] (per expert) @ weight [E, H, O] -> [E, ., O]."""
    spec = "nh,eho->eno" if rows.ndim == 2 else "ech,eho->eco"
    return _scaled(jnp.einsum(spec, rows, weight.astype(rows.dtype)), None if scale is None else scale[:, None])


def _bucketed(x, weights, key, w: ExpertWeights):
    n, k = key.shape
    e, h = w.gate.shape[0], x.shape[1]
    order, token, sorted_key, sizes = _sort_by_expert(key, e)
    local = sorted_key < e
    at = jnp.minimum(sorted_key, e - 1)
    rank = jnp.arange(n * k) - (jnp.cumsum(sizes) - sizes)[at]  # [N*K] row within its expert
    # a token picks an expert at most once, so no group exceeds N rows
    capacities = [8 << i for i in range(max(1, (_next_pow2(n) // 8).bit_length()))]

    def branch(c):
        def run(x):
            dest = jnp.where(local, at * c + rank, e * c)  # [N*K] slot in the [E*C] layout; E*C: not here
            xs = jnp.zeros((e * c, h), x.dtype).at[dest].set(x[token], mode="drop")
            y = _ffn(xs.reshape(e, c, h), _mm_batched, w).reshape(e * c, h)  # [E*C, H]
            return jnp.take(y, dest, axis=0, mode="fill", fill_value=0)  # [N*K, H]
        return run

    # compare_all: one fused compare-and-count; the default binary search is a while loop, which on
    # GPU costs a launch sequence per step and keeps the pass out of one command buffer
    pick = jnp.searchsorted(jnp.asarray(capacities), jnp.max(sizes), method="compare_all")
    y = jax.lax.switch(jnp.minimum(pick, len(capacities) - 1), [branch(c) for c in capacities], x)
    return _combine(y, weights, order, token, n)


def _dense(x, weights, key, w: ExpertWeights):
    e = w.gate.shape[0]
    gates = jnp.zeros((x.shape[0], e + 1), jnp.float32)
    gates = gates.at[jnp.arange(x.shape[0])[:, None], key].add(weights)[:, :e]  # [N, E_local]
    y = _ffn(x, _mm_batched, w)  # [E, N, H]
    return jnp.einsum("enh,ne->nh", y.astype(jnp.float32), gates)


def _pallas_gpu(x, weights, key, w: ExpertWeights):
    from pallas_kernels.expert_ffn import expert_ffn

    e = w.gate.shape[0]
    order, token, _, sizes = _sort_by_expert(key, e)
    # rows in (token, k) order, each token's K side by side, so the combine is a sum, not a scatter
    # (whose zeroed buffer the denoising loop would copy in on every pass); other shards' rows are unwritten
    y = expert_ffn(x, sizes, *w, row_index=token, out_index=order).reshape(*key.shape, -1)  # [N, K, H]
    mine = (key < e)[..., None]
    return jnp.sum(jnp.where(mine, y.astype(jnp.float32) * weights[..., None], 0), axis=1)  # [N, H]


EXPERTS = {"ragged": _grouped(jax.lax.ragged_dot), "pallas": _grouped(_pallas_matmul), "pallas_gpu": _pallas_gpu,
           "tiled": _tiled, "bucketed": _bucketed, "dense": _dense}


def _moe(impl, top_k, eps, offset, x_route, x_expert, proj, scale, expert_scale, w: ExpertWeights):
    """Routes every token of x_route / x_expert [..., H] and computes the share of the experts
    ``offset .. offset + len(gate)`` -> float32 [..., H]."""
    shape = x_expert.shape
    h = shape[-1]
    weights, ids = route(x_route.reshape(-1, h), proj, scale, expert_scale, top_k, eps)
    local = ids - offset
    num_local = w.gate.shape[0]
    key = jnp.where((local >= 0) & (local < num_local), local, num_local)
    return EXPERTS[impl](x_expert.reshape(-1, h), weights, key, w).reshape(shape)


class MoE(nnx.Module):
    """Router + ``num_experts`` gated-GELU experts of width ``moe_intermediate_size``. ``mesh``:
    run expert-parallel over it (see the module docstring); None for one device."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, mesh: Mesh | None = None):
        e, h, i = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.config = config
        self.mesh = mesh
        self.router_proj = param(rngs, (h, e), ("embed", None), dtype)
        self.router_scale = param(rngs, (h,), (None,), dtype, init="ones")
        self.per_expert_scale = param(rngs, (e,), (None,), dtype, init="ones")
        self.gate = param(rngs, (e, h, i), ("expert", "embed", "moe_mlp"), dtype)
        self.up = param(rngs, (e, h, i), ("expert", "embed", "moe_mlp"), dtype)
        self.down = param(rngs, (e, i, h), ("expert", "moe_mlp", "embed"), dtype)
        # int8 serving weights' per-output-channel scales (``dgemma_jax.quant``); None: float experts
        self.gate_scale = self.up_scale = self.down_scale = nnx.data(None)

    def route(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [N, H] -> (weights [N, K] f32, expert ids [N, K] int32)."""
        return route(x, self.router_proj[...], self.router_scale[...], self.per_expert_scale[...],
                     self.config.num_experts_per_tok, self.config.rms_norm_eps)

    def __call__(self, x_route: jax.Array, x_expert: jax.Array) -> jax.Array:
        """x_route [B, ..., H] picks the experts, x_expert [B, ..., H] goes through them -> [B, ..., H].
        On a mesh, the leading (batch) dim is split as the activations' batch is."""
        c = self.config
        scales = [None if v is None else v[...] for v in (self.gate_scale, self.up_scale, self.down_scale)]
        experts = ExpertWeights(whole(self.gate[...]), whole(self.up[...]), whole(self.down[...]), *scales)
        params = (self.router_proj[...], self.router_scale[...], self.per_expert_scale[...], experts)
        platform = self.mesh.devices.flat[0].platform if self.mesh is not None else None
        run = functools.partial(_moe, resolve_impl(c.moe_impl, platform), c.num_experts_per_tok, c.rms_norm_eps)
        if self.mesh is None or self.mesh.size == 1:
            out = run(0, x_route, x_expert, *params)
        else:
            out = _expert_parallel(run, self.mesh, c.num_experts, x_route, x_expert, params)
        return out.astype(x_expert.dtype)


def _expert_parallel(run, mesh: Mesh, num_experts: int, x_route, x_expert, params):
    """``run`` under ``shard_map``: tokens split as activations' batch, experts over ``expert``."""
    tokens = logical_to_spec(("batch",) + (None,) * (x_route.ndim - 1), x_route.shape, mesh, RULES)
    axes = tokens[0] if isinstance(tokens[0], tuple) else (tokens[0],) if tokens[0] else ()
    shards = mesh.shape.get(EXPERT_AXIS, 1)
    experts = PartitionSpec(EXPERT_AXIS if num_experts % shards == 0 and shards > 1 else None)
    split = experts[0] is not None
    gathered = split and EXPERT_AXIS in axes

    def local(x_route, x_expert, proj, scale, expert_scale, w):
        if gathered:  # every device of an expert group sees the same tokens
            x_route = jax.lax.all_gather(x_route, EXPERT_AXIS, axis=0, tiled=True)
            x_expert = jax.lax.all_gather(x_expert, EXPERT_AXIS, axis=0, tiled=True)
        offset = jax.lax.axis_index(EXPERT_AXIS) * w.gate.shape[0] if split else 0
        y = run(offset, x_route, x_expert, proj, scale, expert_scale, w)
        if gathered:
            return jax.lax.psum_scatter(y, EXPERT_AXIS, scatter_dimension=0, tiled=True)
        return jax.lax.psum(y, EXPERT_AXIS) if split else y

    replicated = PartitionSpec()
    return jax.shard_map(
        local, mesh=mesh,
        in_specs=(tokens, tokens, replicated, replicated, replicated, experts),
        out_specs=tokens, check_vma=False,
    )(x_route, x_expert, *params)
