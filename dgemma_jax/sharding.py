"""Logical axis names -> mesh axes. Sharding is a table, not a rewrite of the model.

Every parameter carries ``logical_axes`` (e.g. ``("expert", "embed", "moe_mlp")``). ``RULES`` maps each
logical name to a mesh axis (or a tuple of them, or None). A mesh axis that the mesh lacks, that a
dimension is not divisible by, or that an earlier dimension already uses is dropped, so one table
works for every mesh from one device to a pod.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Default layout: experts over "expert", the model dimension over "fsdp", MLP/heads over "tensor",
# activations' batch over "data" (+ "fsdp", + "expert" when it divides: the MoE layers gather the
# tokens of an expert group and scatter the results back). The vocabulary (the embedding's rows and
# the logits' last axis) over "tensor" and "expert": the logits and the sampler's [B, L, V] work are
# split over the chips the batch does not use.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("vocab", ("tensor", "expert")),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", None),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("expert", "expert"),
    ("moe_mlp", "tensor"),
)


def make_mesh(shape: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """``make_mesh({"fsdp": 2, "expert": 4})`` over the first prod(shape) devices."""
    devices = list(devices if devices is not None else jax.devices())
    n = int(np.prod(list(shape.values())))
    if n > len(devices):
        raise ValueError(f"mesh {shape} needs {n} devices, only {len(devices)} available")
    return Mesh(np.asarray(devices[:n]).reshape(tuple(shape.values())), tuple(shape.keys()))


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules=RULES) -> PartitionSpec:
    """PartitionSpec for a tensor of ``shape`` with logical ``axes`` on ``mesh``."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, dim in zip(axes, shape, strict=True):
        targets = table.get(name) if name is not None else None
        if targets is None:
            spec.append(None)
            continue
        targets = (targets,) if isinstance(targets, str) else tuple(targets)
        chosen = []
        size = 1
        for t in targets:
            n = mesh.shape.get(t, 1)
            if n == 1 or t in used or dim % (size * n):
                continue
            chosen.append(t)
            size *= n
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return PartitionSpec(*spec)


def constrain(x: jax.Array, axes: Sequence[str | None], mesh: Mesh | None, rules=RULES) -> jax.Array:
    """``x`` laid out on ``mesh`` by its logical ``axes`` (a sharding constraint inside jit); ``x``
    itself without a mesh."""
    if mesh is None or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh, rules)))


def variable_sharding(var: nnx.Variable, mesh: Mesh, rules=RULES) -> NamedSharding:
    axes = var.get_metadata("logical_axes", None) or (None,) * len(var.shape)
    return NamedSharding(mesh, logical_to_spec(axes, var.shape, mesh, rules))

