"""Our native checkpoint: ``config.json`` (HF layout) + an orbax checkpoint of the parameters.

Restoring goes straight into each device's shard (no host copy of the whole model), which is what a
TPU pod wants; the HF safetensors layout stays the interchange format.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

PARAMS_DIR = "params"


def is_native(path: Path) -> bool:
    return (Path(path) / PARAMS_DIR).is_dir() and (Path(path) / "config.json").is_file()


def save(module: nnx.Module, out_dir: Path, config_json: dict, side_files=()) -> Path:
    """Writes ``out_dir/config.json`` and ``out_dir/params`` (orbax); atomic like the HF writer."""
    from dgemma_jax.checkpoint import prepare_output, swap_in

    out_dir = Path(out_dir).absolute()
    tmp = prepare_output(out_dir)
    try:
        state = nnx.to_pure_dict(nnx.state(module))
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(tmp / PARAMS_DIR, state)
        ckpt.wait_until_finished()
        (tmp / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True))
        for f in side_files:
            shutil.copy2(f, tmp / Path(f).name)
        swap_in(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
