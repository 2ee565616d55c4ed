"""LoRA adapters on attention, the dense MLP and the experts; merge and export.

An adapter on a weight ``W`` adds ``scale * A @ B`` (``scale = alpha / rank``), where ``A`` takes the
weight's input dimensions to ``rank`` and ``B`` takes ``rank`` to its output dimensions; expert
weights [E, in, out] get one adapter per expert (A [E, in, r], B [E, r, out]). ``B`` starts at zero,
so a fresh adapter leaves the model unchanged.

Adapters are a flat dict ``{"layers.3.attn.q_proj": {"a": ..., "b": ...}}`` keyed by the weight's
path in the module. The training forward pass applies them beside the frozen weights
(:func:`adapt`: ``x @ W + scale * (x @ A) @ B``, :class:`~dgemma_jax.layers.Adapted`): no weight-sized
copy, and small adapter changes are rounded per output instead of lost in each bf16 weight. The
experts' grouped matmuls take whole weights, so expert adapters are merged there. :func:`merge`
(export, evaluation) forms ``W + scale * A @ B`` with the same definition.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dgemma_jax.layers import Adapted

# (module group, weight name) -> (leading batch dims, input dims) of that weight.
_TARGETS = {
    ("attn", "q_proj"): (0, 1), ("attn", "k_proj"): (0, 1), ("attn", "v_proj"): (0, 1), ("attn", "o_proj"): (0, 2),
    ("mlp", "gate"): (0, 1), ("mlp", "up"): (0, 1), ("mlp", "down"): (0, 1),
    ("moe", "gate"): (1, 1), ("moe", "up"): (1, 1), ("moe", "down"): (1, 1),
}
GROUPS = ("attn", "mlp", "moe")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """``targets``: any of "attn", "mlp" (dense MLP), "moe" (every expert)."""

    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = ("attn", "mlp")

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"lora.rank={self.rank}: must be >= 1")
        bad = [t for t in self.targets if t not in GROUPS]
        if bad or not self.targets:
            raise ValueError(f"lora.targets={list(self.targets)}: expected a non-empty subset of {list(GROUPS)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def path_name(path) -> str:
    return ".".join(str(p) for p in path)


def _target(path) -> tuple[int, int] | None:
    """(batch dims, input dims) when ``path`` names an adaptable weight of a decoder layer."""
    if len(path) != 4 or path[0] != "layers":
        return None
    return _TARGETS.get((str(path[2]), str(path[3])))


def init(params: nnx.State, cfg: LoraConfig, seed: int = 0) -> dict[str, dict[str, jax.Array]]:
    """Fresh adapters for every targeted weight in ``params`` (float32; ``B`` zero)."""
    rng = np.random.default_rng(seed)
    adapters = {}
    for path, value in nnx.to_flat_state(params):
        spec = _target(path)
        if spec is None or str(path[2]) not in cfg.targets:
            continue
        batch, n_in = spec
        shape = value.shape
        lead, ins, outs = shape[:batch], shape[batch:batch + n_in], shape[batch + n_in:]
        a = rng.standard_normal(lead + ins + (cfg.rank,), np.float32) / np.sqrt(np.prod(ins))
        adapters[path_name(path)] = dict(a=jnp.asarray(a), b=jnp.zeros(lead + (cfg.rank,) + outs, jnp.float32))
    if not adapters:
        raise ValueError(f"lora.targets={list(cfg.targets)} matched no weight of the model")
    return adapters


def _rewrite(params: nnx.State, adapters: dict, cfg: LoraConfig, finish) -> nnx.State:
    """``params`` with every adapted weight's value replaced by ``finish(Adapted(W, A, B))``."""
    flat = []
    for path, value in nnx.to_flat_state(params):
        name = path_name(path)
        if name in adapters:
            ad = adapters[name]
            value = value.replace(finish(Adapted(value.get_value(), ad["a"], ad["b"], cfg.scale, _target(path)[0])))
        flat.append((path, value))
    return nnx.from_flat_state(flat)


def adapt(params: nnx.State, adapters: dict, cfg: LoraConfig) -> nnx.State:
    """``params`` with every adapted weight an :class:`~dgemma_jax.layers.Adapted` value: the training
    forward pass, which applies the adapters beside the frozen weights (experts merged)."""
    return _rewrite(params, adapters, cfg, lambda w: w)


def merge(params: nnx.State, adapters: dict, cfg: LoraConfig) -> nnx.State:
    """``params`` with every adapted weight replaced by ``W + scale * A @ B`` (in W's dtype)."""
    return _rewrite(params, adapters, cfg, Adapted.merged)


def save(adapters: dict, cfg: LoraConfig, out_dir: str | os.PathLike) -> Path:
    """Writes ``adapter.safetensors`` + ``adapter_config.json`` into ``out_dir`` (atomically)."""
    from safetensors.numpy import save_file

    from dgemma_jax.checkpoint import swap_in

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "adapter_config.json").is_file():
        raise FileExistsError(f"{out_dir}: exists and is not a LoRA adapter directory; refusing to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        tensors = {f"{name}.lora_{k}": np.asarray(v) for name, ad in adapters.items() for k, v in ad.items()}
        save_file(tensors, str(tmp / "adapter.safetensors"))
        (tmp / "adapter_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
        swap_in(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def load(directory: str | os.PathLike) -> tuple[dict, LoraConfig]:
    """Reads what :func:`save` wrote."""
    from safetensors.numpy import load_file

    directory = Path(directory)
    cfg_file, weights = directory / "adapter_config.json", directory / "adapter.safetensors"
    for f in (cfg_file, weights):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: not found (expected a LoRA adapter directory)")
    raw = json.loads(cfg_file.read_text())
    cfg = LoraConfig(rank=raw["rank"], alpha=raw["alpha"], targets=tuple(raw["targets"]))
    adapters: dict[str, dict[str, jax.Array]] = {}
    for key, value in load_file(str(weights)).items():
        name, _, part = key.rpartition(".lora_")
        if part not in ("a", "b"):
            raise ValueError(f"{weights}: unexpected tensor {key!r}")
        adapters.setdefault(name, {})[part] = jnp.asarray(value)
    return adapters, cfg
