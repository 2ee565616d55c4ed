"""Small building blocks: parameters with logical axes, LoRA-adapted weights, RMSNorm, RoPE, the gated
MLP."""

from __future__ import annotations

import dataclasses

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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Adapted:
    """A frozen weight with a LoRA adapter, ``base + scale * A @ B``, as a parameter's value in training.

    ``A`` [*batch, *ins, r] takes the weight's input dims to the rank and ``B`` [*batch, r, *outs] the
    rank to its output dims (``batch``: leading dims with an adapter each, e.g. the experts). Products
    through :func:`project` never form the sum: ``x @ base + scale * (x @ A) @ B``, so no weight-sized
    copy is made and the adapter's contribution is rounded per output, not into each weight (where a
    change under half a bf16 step is lost for every token).
    """

    base: jax.Array
    a: jax.Array
    b: jax.Array
    scale: float = dataclasses.field(metadata=dict(static=True))
    batch: int = dataclasses.field(default=0, metadata=dict(static=True))

    def __getitem__(self, index):
        """``variable[...]`` reads the whole value."""
        if index is not Ellipsis:
            raise TypeError(f"an adapted weight is read whole (variable[...]), not indexed with {index!r}")
        return self

    def merged(self) -> jax.Array:
        """``base + scale * A @ B``, summed in float32, in the base weight's dtype."""
        lead = "e" if self.batch else ""
        ins = "ijk"[: self.a.ndim - self.batch - 1]
        outs = "uvw"[: self.b.ndim - self.batch - 1]
        delta = jnp.einsum(f"{lead}{ins}r,{lead}r{outs}->{lead}{ins}{outs}", self.a, self.b)
        return (self.base.astype(jnp.float32) + self.scale * delta).astype(self.base.dtype)

    def project(self, spec: str, x: jax.Array) -> jax.Array:
        """``jnp.einsum(spec, x, merged())`` as ``x @ base + scale * (x @ A) @ B``, in the dtype of
        ``x @ base``. ``spec`` contracts x with the weight, e.g. ``"bth,hnd->btnd"`` or ``"...h,hi->...i"``."""
        if self.batch:
            raise ValueError("project: a weight with per-expert adapters is applied merged (Adapted.merged)")
        operands, out = spec.split("->")
        xs, ws = operands.split(",")
        ins = "".join(c for c in ws if c in xs)  # contracted with x
        outs = "".join(c for c in ws if c not in xs)
        kept = "".join(c for c in out if c not in outs)  # x's dims that stay
        r = next(c for c in "rzyxwq" if c not in spec)
        y = jnp.einsum(spec, x, self.base)
        low = jnp.einsum(f"{xs},{ins}{r}->{kept}{r}", x, self.a)
        delta = jnp.einsum(f"{kept}{r},{r}{outs}->{out}", low, self.b)
        return (y.astype(jnp.float32) + self.scale * delta.astype(jnp.float32)).astype(y.dtype)


def project(spec: str, x: jax.Array, weight) -> jax.Array:
    """``jnp.einsum(spec, x, weight)`` for a plain or an :class:`Adapted` weight."""
    if isinstance(weight, Adapted):
        return weight.project(spec, x)
    return jnp.einsum(spec, x, weight)


def whole(weight) -> jax.Array:
    """The weight as one array: an :class:`Adapted` weight merged (for consumers of whole weights,
    such as the MoE back ends' grouped matmuls)."""
    return weight.merged() if isinstance(weight, Adapted) else weight


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
        gate, up = project("...h,hi->...i", x, self.gate[...]), project("...h,hi->...i", x, self.up[...])
        return project("...i,ih->...h", jax.nn.gelu(gate, approximate=True) * up, self.down[...])
