"""Small building blocks: parameters with logical axes, RMSNorm, RoPE, the gated MLP."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dgemma_jax.config import ModelConfig, RopeConfig


class Buffer(nnx.Variable):
    """A non-trainable tensor that the checkpoint stores (e.g. ``layer_scalar``)."""


def param(rngs: nnx.Rngs, shape, axes, dtype, init: str = "normal", kind=nnx.Param, std: float = 0.02):
    """A parameter tagged with logical axis names (``sharding.RULES`` maps them to a mesh)."""
    assert len(axes) == len(shape), (shape, axes)
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return kind(value, logical_axes=tuple(axes), init=init, init_std=std)


def host_init(var: nnx.Variable, rng: np.random.Generator) -> np.ndarray:
    """A fresh value for ``var`` drawn on the host, following its ``init`` metadata."""
    shape, dtype = var.shape, var.get_value().dtype
    kind = var.get_metadata("init", "normal")
    if kind in ("ones", "zeros"):
        return (np.ones if kind == "ones" else np.zeros)(shape, dtype)
    return (var.get_metadata("init_std", 0.02) * rng.standard_normal(shape, np.float32)).astype(dtype)


def _inverse_rms(x: jax.Array, eps: float) -> jax.Array:
    """(mean(x^2) + eps)^-1/2 over the last dim, in float32: [..., D] -> [..., 1]."""
    xf = x.astype(jnp.float32)
    return jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)


def inverse_rms(xs: list[jax.Array], eps: float) -> list[jax.Array]:
    """``_inverse_rms`` of each x in xs [..., heads_i, D] (the same leading dims and D) -> [..., heads_i,
    1] each, as one reduction over their heads side by side: on GPU each reduction is a kernel launch
    of its own."""
    inverse = _inverse_rms(jnp.concatenate(xs, axis=-2), eps)
    return jnp.split(inverse, np.cumsum([x.shape[-2] for x in xs])[:-1].tolist(), axis=-2)


def rms_norm(x: jax.Array, scale: jax.Array | None, eps: float, inverse: jax.Array | None = None) -> jax.Array:
    """x * (mean(x^2) + eps)^-1/2 [* scale], computed in float32, returned in x's dtype. ``inverse``:
    that factor when already computed (``inverse_rms``)."""
    xf = x.astype(jnp.float32)
    y = xf * (_inverse_rms(x, eps) if inverse is None else inverse)
    if scale is not None:
        y = y * scale.astype(jnp.float32)
    return y.astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, rngs: nnx.Rngs, dtype=jnp.float32, with_scale: bool = True):
        self.eps = eps
        self.scale = param(rngs, (dim,), (None,), dtype, init="ones") if with_scale else None

    def __call__(self, x: jax.Array, inverse: jax.Array | None = None) -> jax.Array:
        return rms_norm(x, None if self.scale is None else self.scale[...], self.eps, inverse)


def rope_frequencies(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """Inverse frequencies [head_dim // 2]; zero for the unrotated part of a proportional RoPE."""
    if rope.rope_type == "proportional":
        rotated = int(rope.partial_rotary_factor * head_dim // 2)
        inv = 1.0 / rope.theta ** (np.arange(0, 2 * rotated, 2, dtype=np.float32) / head_dim)
        inv = np.concatenate([inv, np.zeros(head_dim // 2 - rotated, np.float32)])
    else:
        inv = 1.0 / rope.theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    return (inv / rope.factor).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate-half RoPE. x [B, T, N, D], positions [B, T] -> [B, T, N, D]."""
    freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)  # [B, T, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


class GatedMLP(nnx.Module):
    """down(gelu_tanh(x @ gate) * (x @ up))."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        h, i = config.hidden_size, config.intermediate_size
        self.gate = param(rngs, (h, i), ("embed", "mlp"), dtype)
        self.up = param(rngs, (h, i), ("embed", "mlp"), dtype)
        self.down = param(rngs, (i, h), ("mlp", "embed"), dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return (jax.nn.gelu(x @ self.gate[...], approximate=True) * (x @ self.up[...])) @ self.down[...]
