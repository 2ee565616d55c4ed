"""ml_collections config files (``configs/model/*.py``) <-> :class:`~dgemma_jax.config.ModelConfig`.

A config file is a Python module with ``get_config()`` returning an ``ml_collections.ConfigDict``
whose keys are ``ModelConfig`` field names. Two fields take plain containers instead of our types:

* ``layer_types``: a list of ``"sliding_attention"`` / ``"full_attention"``;
* ``rope``: a dict ``layer_type -> dict(rope_type=..., theta=..., partial_rotary_factor=..., factor=...)``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_collections

from dgemma_jax.config import ConfigError, ModelConfig, RopeConfig

_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}
_ROPE_FIELDS = {f.name for f in dataclasses.fields(RopeConfig)}


def _plain(value: Any) -> Any:
    """ConfigDict / FrozenConfigDict / nested containers -> plain dicts and lists."""
    if isinstance(value, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def model_config_from_dict(cfg: Mapping[str, Any] | ml_collections.ConfigDict, source: str = "config") -> ModelConfig:
    """Builds a :class:`ModelConfig` from a (Config)dict of its fields.

    Unknown keys are an error (a typo must not silently fall back to a default); missing keys take
    ``ModelConfig``'s defaults, which are the 26B-A4B values.
    """
    data = _plain(cfg)
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a dict of ModelConfig fields, found {type(cfg).__name__}")
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        raise ConfigError(f"{source}: unknown ModelConfig field(s): {', '.join(unknown)}")
    kwargs = dict(data)
    if "layer_types" in kwargs:
        kwargs["layer_types"] = tuple(kwargs["layer_types"])
    if "eos_token_ids" in kwargs:
        eos = kwargs["eos_token_ids"]
        kwargs["eos_token_ids"] = tuple(eos) if isinstance(eos, list) else (int(eos),)
    if "rope" in kwargs:
        kwargs["rope"] = _rope_from_dict(kwargs["rope"], kwargs.get("layer_types", ModelConfig.layer_types), source)
    try:
        return ModelConfig(**kwargs)
    except TypeError as e:  # e.g. a value of the wrong kind reaching the dataclass
        raise ConfigError(f"{source}: {e}") from e


def _rope_from_dict(rope: Any, layer_types, source: str) -> tuple[tuple[str, RopeConfig], ...]:
    if not isinstance(rope, dict):
        raise ConfigError(f"{source}: rope must be a dict layer_type -> rope settings, found {type(rope).__name__}")
    # Order: layer types as they first appear in the model, then any others (ConfigDict sorts keys).
    order = list(dict.fromkeys(lt for lt in layer_types if lt in rope)) + sorted(k for k in rope if k not in layer_types)
    out = []
    for lt in order:
        settings = rope[lt]
        if not isinstance(settings, dict):
            raise ConfigError(f"{source}: rope[{lt!r}] must be a dict, found {type(settings).__name__}")
        unknown = sorted(set(settings) - _ROPE_FIELDS)
        if unknown:
            raise ConfigError(f"{source}: rope[{lt!r}]: unknown field(s): {', '.join(unknown)}")
        typed = {k: (str(v) if k == "rope_type" else float(v)) for k, v in settings.items()}
        out.append((lt, RopeConfig(**typed)))
    return tuple(out)


def model_config_to_dict(config: ModelConfig) -> ml_collections.ConfigDict:
    """The inverse of :func:`model_config_from_dict`."""
    data = dataclasses.asdict(config)
    data["layer_types"] = list(config.layer_types)
    data["eos_token_ids"] = list(config.eos_token_ids)
    data["rope"] = {lt: dataclasses.asdict(r) for lt, r in config.rope}
    return ml_collections.ConfigDict(data)


def load_config_file(path: str | Path) -> ml_collections.ConfigDict:
    """Imports the Python file ``path`` and returns its ``get_config()``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    if path.suffix != ".py":
        raise ConfigError(f"{path}: expected a Python config file (*.py) with get_config()")
    module_name = f"_dgemma_config_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{path}: cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(module_name, None)
        raise ConfigError(f"{path}: importing it failed: {type(e).__name__}: {e}") from e
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ConfigError(f"{path}: defines no get_config()")
    cfg = get_config()
    if not isinstance(cfg, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict, dict)):
        raise ConfigError(f"{path}: get_config() returned {type(cfg).__name__}, expected a ConfigDict")
    return cfg if not isinstance(cfg, dict) else ml_collections.ConfigDict(cfg)


def load_model_config(path: str | Path) -> ModelConfig:
    """``load_config_file`` + ``model_config_from_dict``: a ``configs/model/*.py`` file -> ModelConfig."""
    return model_config_from_dict(load_config_file(path), source=str(path))


__all__ = ["load_config_file", "load_model_config", "model_config_from_dict", "model_config_to_dict"]


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: list[str], prefix: str = "--config.") -> ml_collections.ConfigDict:
    """Applies ``--config.a.b=value`` overrides in place (values parsed as Python literals, else kept
    as strings; ConfigDict's type checks apply). ConfigError naming the override when it is bad."""
    import ast

    for item in overrides:
        if not item.startswith(prefix) or "=" not in item:
            raise ConfigError(f"{item!r}: expected {prefix}FIELD=VALUE")
        dotted, _, text = item[len(prefix):].partition("=")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        *parents, leaf = dotted.split(".")
        node = cfg
        for i, name in enumerate(parents):
            if name not in node or not isinstance(node[name], ml_collections.ConfigDict):
                raise ConfigError(f"{item!r}: config has no section {'.'.join(parents[: i + 1])!r}")
            node = node[name]
        if leaf not in node:
            raise ConfigError(f"{item!r}: config has no field {dotted!r}")
        if isinstance(node[leaf], float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(node[leaf], (tuple, list)) and isinstance(value, (tuple, list)):
            value = type(node[leaf])(value)
        try:
            node[leaf] = value
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{item!r}: {e}") from e
    return cfg


__all__.append("apply_overrides")
