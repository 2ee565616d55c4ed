"""Our native checkpoint: ``config.json`` (HF layout) + an orbax checkpoint of the parameters.

Restoring goes straight into each device's shard (no host copy of the whole model), which is what a
TPU pod wants; the HF safetensors layout stays the interchange format.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from dgemma_jax.checkpoint import atomic_output

PARAMS_DIR = "params"


def is_native(path: Path) -> bool:
    return (Path(path) / PARAMS_DIR).is_dir() and (Path(path) / "config.json").is_file()


def save(module: nnx.Module, out_dir: Path, config_json: dict, side_files=()) -> Path:
    """Writes ``out_dir/config.json`` and ``out_dir/params`` (orbax); atomic like the HF writer."""
    out_dir = Path(out_dir).absolute()
    with atomic_output(out_dir, config_json, side_files) as tmp:
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(tmp / PARAMS_DIR, nnx.to_pure_dict(nnx.state(module)))
            ckpt.wait_until_finished()
    return out_dir


def restore(path: Path, abstract: nnx.Module, dtype, sharding_of=None) -> None:
    """Fills the abstract module with the saved parameters, cast to ``dtype`` and placed by ``sharding_of``."""
    state = nnx.state(abstract)

    def target(var):
        sharding = sharding_of(var) if sharding_of else jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.ShapeDtypeStruct(var.shape, dtype, sharding=sharding)

    targets = jax.tree.map(target, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    with ocp.StandardCheckpointer() as ckpt:
        restored = ckpt.restore(Path(path).absolute() / PARAMS_DIR, nnx.to_pure_dict(targets))
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(abstract, state)
