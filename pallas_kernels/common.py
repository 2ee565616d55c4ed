"""Helpers both kernels use: block-size fitting and the interpret-mode default."""

from __future__ import annotations

import jax


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def fit(tile: int, dim: int, align: int) -> int:
    """The block actually used along a dim: ``tile``, or the whole dim rounded up to ``align`` when
    the dim is smaller."""
    return tile if dim > tile else round_up(dim, align)


def run_interpreted(interpret: bool | None) -> bool:
    """None = interpret unless the default backend is TPU (Mosaic kernels run only there)."""
    return jax.default_backend() != "tpu" if interpret is None else interpret
