"""Weight-only int8 quantisation of the experts, for serving.

The experts hold 90 % of the 26B-A4B model's bytes (22.8 B of 25.3 B parameters), and a denoising
pass at serving batch sizes is bound by reading them. ``quantize`` stores each expert
matrix as int8 with one float32 scale per output channel (symmetric, absmax / 127), halving those
bytes; every MoE back end multiplies the scale in after its product (``moe.ExpertWeights``), so the
weights are read as int8. Everything else (embedding, attention, dense MLP, router) stays in the
model's dtype. Inference only: a quantised model has no gradient path and cannot be saved.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dgemma_jax.moe import MoE
from dgemma_jax.sharding import variable_sharding

MODES = ("none", "int8")


def quantize_int8(w: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """w [..., in, ...] -> (int8 values, float32 scales with ``axis`` (the input dim) dropped).

    Symmetric per-output-channel: scale = max |w| over ``axis`` / 127 (1 where a channel is all
    zero), value = round(w / scale). ``values * scale`` is within scale / 2 of w."""
    wf = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(wf), axis=axis, keepdims=True)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    q = jnp.clip(jnp.round(wf / scale), -127, 127).astype(jnp.int8)
    return q, jnp.squeeze(scale, axis)


def dequantize(q: jax.Array, scale: jax.Array, axis: int, dtype=jnp.float32) -> jax.Array:
    """The inverse of ``quantize_int8`` (up to rounding): q * scale, scale re-expanded on ``axis``."""
    return (q.astype(jnp.float32) * jnp.expand_dims(scale, axis)).astype(dtype)


def _moe_layers(module: nnx.Module) -> list[MoE]:
    return [m for _, m in nnx.iter_graph(module) if isinstance(m, MoE)]


def is_quantized(module: nnx.Module) -> bool:
    return any(m.gate_scale is not None for m in _moe_layers(module))


def quantize(module: nnx.Module, mode: str = "int8") -> nnx.Module:
    """Quantises every MoE layer's experts of ``module`` in place (``mode``: ``"int8"``; ``"none"``
    leaves it as it is) and returns it. Layer by layer, so at most one layer's float experts exist
    twice. Sharded weights stay sharded (the scales follow the expert and output axes)."""
    if mode not in MODES:
        raise ValueError(f"quantize={mode!r}: expected one of {', '.join(MODES)}")
    if mode == "none":
        return module
    if is_quantized(module):
        raise ValueError("quantize: the model is already quantised")
    run = jax.jit(quantize_int8, static_argnums=1)
    for layer in _moe_layers(module):
        for name in ("gate", "up", "down"):
            var = getattr(layer, name)
            axes = var.get_metadata("logical_axes", (None,) * 3)
            q, scale = run(var[...], 1)  # reduce over the input dim (H for gate/up, I for down)
            new = (nnx.Param(q, logical_axes=axes), nnx.Param(scale, logical_axes=(axes[0], axes[2])))
            if layer.mesh is not None:
                for v in new:
                    v.set_value(jax.device_put(v[...], variable_sharding(v, layer.mesh)))
            setattr(layer, name, new[0])
            setattr(layer, f"{name}_scale", new[1])
    return module
