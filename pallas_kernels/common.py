"""Helpers the kernels share: block-size fitting, zero padding and the choice between the compiled
and the interpreted kernel."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


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


def exact_block(tile: int, dim: int, align: int) -> int:
    """The block used along a dim that should not be padded (padding a weight copies it on every
    call): the whole dim when it is at most ``tile`` (a block may span a whole dim of any size), else
    the largest multiple of ``align`` up to ``tile`` that divides the dim; ``tile`` when there is none,
    and then the dim is padded to a multiple of it."""
    if dim <= tile:
        return dim
    return max((b for b in range(align, tile + 1, align) if dim % b == 0), default=tile)


def pallas_call(kernel, *, platform: str, interpret: bool | None, **kwargs):
    """``pl.pallas_call(kernel, **kwargs)``, compiled for ``platform`` (``"tpu"``: Mosaic, ``"cuda"``:
    Triton) and interpreted on every other platform. ``interpret``: None = chosen by the platform the
    program is lowered for (``lax.platform_dependent``), not by this process's default backend, so a
    program compiled ahead of time for a TPU or GPU topology from a CPU host gets the real kernel;
    True / False force one."""
    if interpret is not None:
        return pl.pallas_call(kernel, interpret=interpret, **kwargs)
    compiled = pl.pallas_call(kernel, interpret=False, **kwargs)
    interpreted = pl.pallas_call(kernel, interpret=True, **kwargs)
    return lambda *args: jax.lax.platform_dependent(*args, default=interpreted, **{platform: compiled})


def lower_for_gpu(jitted, *args, device_kind: str = "NVIDIA H100 80GB HBM3"):
    """``jitted.trace(*args).lower`` for CUDA on a machine without a GPU, as jax does it (the Pallas
    kernels in Triton custom calls). jax >= 0.11 reads the GPU a Triton kernel is built for from the
    device, so it is named here as the abstract mesh's device, for the trace and the lowering."""
    device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=None, platform="cuda")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("gpu",), abstract_device=device)):
        return jitted.trace(*args).lower(lowering_platforms=("cuda",))
