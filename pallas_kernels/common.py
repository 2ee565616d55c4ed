"""Helpers the kernels share: block-size fitting, zero padding and the interpret-mode default."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def pad_to(x: jax.Array, sizes: dict[int, int]) -> jax.Array:
    """Zero-pads the dims named in ``sizes`` (axis -> size) at their end (a no-op when they match)."""
    pads = [(0, sizes.get(axis, size) - size) for axis, size in enumerate(x.shape)]
    return x if not any(p for _, p in pads) else jnp.pad(x, pads)


def fit(tile: int, dim: int, align: int) -> int:
    """The block actually used along a dim: ``tile``, or the whole dim rounded up to ``align`` when
    the dim is smaller."""
    return tile if dim > tile else round_up(dim, align)


def run_interpreted(interpret: bool | None) -> bool:
    """None = interpret unless the default backend is TPU (Mosaic kernels run only there)."""
    return jax.default_backend() != "tpu" if interpret is None else interpret
