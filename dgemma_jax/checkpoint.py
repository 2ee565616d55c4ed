"""Hugging Face safetensors <-> our parameters.

Loading streams one tensor at a time (peak host memory stays near one copy of the weights), checks
every name and shape against the config, casts to the requested dtype and places each tensor with its
sharding. Tied copies (encoder and decoder halves, ``lm_head``) must agree byte for byte. Vision-tower
tensors are not used; they are carried through to ``save`` unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from dgemma_jax.config import SLIDING, ModelConfig

log = logging.getLogger("dgemma_jax")

DECODER = "model.decoder."
ENCODER = "model.encoder.language_model."
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Snapshot files copied along by save_pretrained.
SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
              "special_tokens_map.json", "chat_template.jinja", "processor_config.json")
_PASSTHROUGH = re.compile(r"^model\.encoder\.(vision_tower|embed_vision)\.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and tensor at fault."""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One HF tensor (name relative to the decoder prefix) and how it maps to our parameters."""

    name: str
    hf_shape: tuple[int, ...]
    targets: tuple[tuple[str, ...], ...]  # our parameter paths
    to_ours: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    to_hf: Callable[..., np.ndarray]


def _linear(name, path, out_shape_ours, hf_shape):
    """HF Linear weight [out, in] <-> ours [in, ...out dims]."""
    return TensorSpec(
        name, hf_shape, (path,),
        lambda w: (w.T.reshape(out_shape_ours),),
        lambda w: w.reshape(out_shape_ours[0], -1).T,
    )


def _out_proj(name, path, n, d, h):
    """HF o_proj [H, N*D] <-> ours [N, D, H]."""
    return TensorSpec(name, (h, n * d), (path,), lambda w: (w.T.reshape(n, d, h),), lambda w: w.reshape(n * d, h).T)


def _same(name, path, shape):
    return TensorSpec(name, shape, (path,), lambda w: (w,), lambda w: w)


def tensor_specs(config: ModelConfig) -> list[TensorSpec]:
    """Every text tensor of a checkpoint for ``config``, in checkpoint order."""
    h, v, n = config.hidden_size, config.vocab_size, config.num_heads
    i_dense, i_moe, e = config.intermediate_size, config.moe_intermediate_size, config.num_experts
    specs = [_same("embed_tokens.weight", ("embedding",), (v, h))]
    for li, lt in enumerate(config.layer_types):
        d, kh = config.layer_head_dim(lt), config.layer_kv_heads(lt)
        p, our = f"layers.{li}.", ("layers", li)
        specs += [
            _same(p + "layer_scalar", our + ("layer_scalar",), (1,)),
            _linear(p + "self_attn.q_proj.weight", our + ("attn", "q_proj"), (h, n, d), (n * d, h)),
            _linear(p + "self_attn.k_proj.weight", our + ("attn", "k_proj"), (h, kh, d), (kh * d, h)),
        ]
        if lt == SLIDING:
            specs.append(_linear(p + "self_attn.v_proj.weight", our + ("attn", "v_proj"), (h, kh, d), (kh * d, h)))
        specs += [
            _out_proj(p + "self_attn.o_proj.weight", our + ("attn", "o_proj"), n, d, h),
            _same(p + "self_attn.q_norm.weight", our + ("attn", "q_norm", "scale"), (d,)),
            _same(p + "self_attn.k_norm.weight", our + ("attn", "k_norm", "scale"), (d,)),
            _linear(p + "mlp.gate_proj.weight", our + ("mlp", "gate"), (h, i_dense), (i_dense, h)),
            _linear(p + "mlp.up_proj.weight", our + ("mlp", "up"), (h, i_dense), (i_dense, h)),
            _linear(p + "mlp.down_proj.weight", our + ("mlp", "down"), (i_dense, h), (h, i_dense)),
        ]
        for hf_norm, our_norm in (
            ("input_layernorm", "input_norm"),
            ("post_attention_layernorm", "post_attn_norm"),
            ("pre_feedforward_layernorm", "pre_mlp_norm"),
            ("post_feedforward_layernorm", "post_ffw_norm"),
            ("post_feedforward_layernorm_1", "post_mlp_norm"),
            ("post_feedforward_layernorm_2", "post_moe_norm"),
            ("pre_feedforward_layernorm_2", "pre_moe_norm"),
        ):
            specs.append(_same(f"{p}{hf_norm}.weight", our + (our_norm, "scale"), (h,)))
        specs += [
            _same(p + "router.scale", our + ("moe", "router_scale"), (h,)),
            _same(p + "router.per_expert_scale", our + ("moe", "per_expert_scale"), (e,)),
            _linear(p + "router.proj.weight", our + ("moe", "router_proj"), (h, e), (e, h)),
            TensorSpec(
                p + "experts.gate_up_proj", (e, 2 * i_moe, h),
                (our + ("moe", "gate"), our + ("moe", "up")),
                lambda w, i=i_moe: (w[:, :i].transpose(0, 2, 1), w[:, i:].transpose(0, 2, 1)),
                lambda g, u: np.concatenate([g, u], axis=2).transpose(0, 2, 1),
            ),
            TensorSpec(
                p + "experts.down_proj", (e, h, i_moe), (our + ("moe", "down"),),
                lambda w: (w.transpose(0, 2, 1),), lambda w: w.transpose(0, 2, 1),
            ),
        ]
    specs += [
        _same("norm.weight", ("final_norm", "scale"), (h,)),
        _same("self_conditioning.pre_norm.weight", ("self_conditioning", "pre_norm", "scale"), (h,)),
        _linear("self_conditioning.gate_proj.weight", ("self_conditioning", "mlp", "gate"), (h, i_dense), (i_dense, h)),
        _linear("self_conditioning.up_proj.weight", ("self_conditioning", "mlp", "up"), (h, i_dense), (i_dense, h)),
        _linear("self_conditioning.down_proj.weight", ("self_conditioning", "mlp", "down"), (i_dense, h), (h, i_dense)),
    ]
    return specs


def canonical_name(key: str) -> str | None:
    """Checkpoint key -> spec name (encoder and decoder copies share one), or None if not a text tensor."""
    if key == "lm_head.weight":
        return "embed_tokens.weight"
    for prefix in (DECODER, ENCODER):
        if key.startswith(prefix):
            return key[len(prefix):]
    return None


# ---- reading ---------------------------------------------------------------------------------


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a snapshot: from the index json if present, else ``*.safetensors``."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
        files = sorted({path / f for f in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{index}: lists {f.name}, which is missing from {path}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files (and no {INDEX_FILE})")
    return files


_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_ALIGN = 64  # XLA:CPU adopts host buffers aligned like this without copying them


def aligned_empty(shape, dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + _ALIGN, np.uint8)
    offset = -raw.ctypes.data % _ALIGN
    return raw[offset : offset + nbytes].view(dtype).reshape(shape)


def read_header(f: Path) -> tuple[dict, int]:
    """The safetensors header of ``f`` (tensor entries only) and where the data section starts."""
    try:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if size < 8 or n > size - 8:
                raise ValueError(f"header length {n} does not fit in a {size}-byte file")
            header = json.loads(fh.read(n))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{f}: cannot read safetensors header ({e})") from e
    header.pop("__metadata__", None)
    data_start = 8 + n
    for key, entry in header.items():
        begin, end = entry.get("data_offsets", (0, -1))
        dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise CheckpointError(f"{f}: tensor {key}: unsupported dtype {entry.get('dtype')!r}")
        expected = int(np.prod(entry["shape"], dtype=np.int64)) * np.dtype(dtype).itemsize
        if end - begin != expected or data_start + end > size:
            raise CheckpointError(f"{f}: tensor {key}: data offsets {begin}..{end} do not fit the file (truncated?)")
    return header, data_start


def iter_tensors(files: list[Path]) -> Iterator[tuple[Path, str, Callable[[], np.ndarray], tuple[int, ...]]]:
    """(file, key, load(), shape) for every tensor, from the headers alone; ``load`` reads just that
    tensor from disk into a fresh aligned buffer (no memory map, so no shard stays resident)."""
    for f in files:
        header, data_start = read_header(f)
        for key, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):

            def load(f=f, key=key, entry=entry, data_start=data_start):
                out = aligned_empty(entry["shape"], _SAFETENSORS_DTYPES[entry["dtype"]])
                with open(f, "rb") as fh:
                    fh.seek(data_start + entry["data_offsets"][0])
                    if fh.readinto(out.reshape(-1).view(np.uint8)) != out.nbytes:
                        raise CheckpointError(f"{f}: tensor {key}: file ended before its data")
                return out

            yield f, key, load, tuple(entry["shape"])


def _cast(x: np.ndarray, dtype) -> np.ndarray:
    """``x`` as a contiguous, aligned array of ``dtype`` (one copy at most)."""
    dtype = np.dtype(dtype)
    if x.dtype == dtype and x.flags.c_contiguous and x.ctypes.data % _ALIGN == 0:
        return x
    out = aligned_empty(x.shape, dtype)
    np.copyto(out, x, casting="unsafe")
    return out


def load_params(path: Path, config: ModelConfig, abstract: nnx.Module, dtype, sharding_of=None, progress=None):
    """Fills the abstract module ``abstract`` (from ``nnx.eval_shape``) with the checkpoint's tensors.

    ``sharding_of(var)`` gives each variable's placement (None: default device). Returns the list of
    passthrough (vision) tensors as ``(file, key)``.
    """
    specs = {s.name: s for s in tensor_specs(config)}
    variables = {p: v for p, v in nnx.iter_graph(abstract) if isinstance(v, nnx.Variable)}
    # Check every name and shape from the headers before reading any data.
    passthrough, unknown, todo = [], [], []
    for f, key, load, shape in iter_tensors(checkpoint_files(path)):
        name = canonical_name(key)
        if _PASSTHROUGH.match(key):
            passthrough.append((f, key))
        elif name not in specs:
            unknown.append(f"{f.name}: {key}")
        elif shape != specs[name].hf_shape:
            raise CheckpointError(f"{f}: tensor {key}: expected shape {specs[name].hf_shape}, found {shape}")
        else:
            todo.append((f, key, name, load))
    if unknown:
        raise CheckpointError(f"{path}: unexpected tensors: " + ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else ""))
    missing = [DECODER + n for n in specs.keys() - {name for _, _, name, _ in todo}]
    if missing:
        raise CheckpointError(
            f"{path}: missing tensors ({len(missing)}): " + ", ".join(sorted(missing)[:5]) + (" ..." if len(missing) > 5 else "")
        )
    seen: dict[str, tuple[str, str]] = {}  # name -> (first key, digest); tied copies must agree
    for f, key, name, load in todo:
        raw = load()
        digest = hashlib.sha1(raw.reshape(-1).view(np.uint8)).hexdigest()
        if name in seen:
            if digest != seen[name][1]:
                raise CheckpointError(f"{f}: tensor {key} differs from its tied copy {seen[name][0]}")
            continue
        seen[name] = (key, digest)
        for target, value in zip(specs[name].targets, specs[name].to_ours(raw), strict=True):
            var = variables[target]
            var.set_value(jax.device_put(_cast(value, dtype), sharding_of(var) if sharding_of else None))
        del raw, value
        if progress:
            progress(1)
    if passthrough:
        log.warning("%s: not loading %d vision-tower tensors (image input is not supported yet; "
                    "save_pretrained keeps them)", path, len(passthrough))
    return passthrough


# ---- writing ---------------------------------------------------------------------------------


def _to_host(x) -> np.ndarray:
    return np.asarray(jax.device_get(x))


def iter_hf_tensors(module: nnx.Module, config: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """(checkpoint key, array) in transformers' own layout, one tensor at a time."""
    variables = {p: v for p, v in nnx.iter_graph(module) if isinstance(v, nnx.Variable)}
    for spec in tensor_specs(config):
        arrays = [_to_host(variables[t].get_value()) for t in spec.targets]
        tensor = np.ascontiguousarray(spec.to_hf(*arrays))
        yield DECODER + spec.name, tensor
        if spec.name.endswith("layer_scalar"):  # a buffer: transformers keeps an encoder copy too
            yield ENCODER + spec.name, tensor


def write_checkpoint(out_dir: Path, tensors: Iterator[tuple[str, np.ndarray]], config_json: dict,
                     side_files: list[Path] = (), max_shard_bytes: int = 5 * 2**30, progress=None) -> None:
    """Writes config.json, safetensors shards (+ index when more than one) atomically into ``out_dir``."""
    with atomic_output(Path(out_dir), config_json, side_files) as tmp:
        shard_files: list[str] = []
        weight_map: dict[str, str] = {}
        total = 0

        def write(shard: dict[str, np.ndarray]) -> None:
            name = f"model-{len(shard_files) + 1:05d}.safetensors"
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            shard_files.append(name)
            weight_map.update(dict.fromkeys(shard, name))

        shard, size = {}, 0
        for key, arr in tensors:
            if shard and size + arr.nbytes > max_shard_bytes:
                write(shard)
                shard, size = {}, 0
            shard[key] = arr
            size += arr.nbytes
            total += arr.nbytes
            if progress:
                progress(1)
        write(shard)
        del shard
        count = len(shard_files)
        if count == 1:
            os.replace(tmp / shard_files[0], tmp / SINGLE_FILE)
        else:
            final_names = {}
            for i, name in enumerate(shard_files, 1):
                final = f"model-{i:05d}-of-{count:05d}.safetensors"
                os.replace(tmp / name, tmp / final)
                final_names[name] = final
            index = {"metadata": {"total_size": total}, "weight_map": {k: final_names[v] for k, v in weight_map.items()}}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))


@contextlib.contextmanager
def atomic_output(out_dir: Path, config_json: dict, side_files=()) -> Iterator[Path]:
    """Yields an empty sibling directory to write a checkpoint into; on success adds config.json and
    the side files and swaps it in for ``out_dir``; on any failure removes it, leaving ``out_dir`` as it was."""
    tmp = prepare_output(out_dir)
    try:
        yield tmp
        (tmp / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True))
        for f in side_files:
            shutil.copy2(f, tmp / Path(f).name)
        swap_in(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def prepare_output(out_dir: Path) -> Path:
    """Checks that ``out_dir`` may be (re)placed and returns an empty sibling directory to write into."""
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / "config.json").is_file())):
        raise FileExistsError(f"{out_dir}: exists and is not a checkpoint directory; refusing to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))


def swap_in(tmp: Path, out_dir: Path) -> None:
    """Replaces ``out_dir`` by ``tmp`` with renames only (the old one survives any failure before)."""
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.rmdir(old)
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def passthrough_tensors(items: list[tuple[Path, str]]) -> Iterator[tuple[str, np.ndarray]]:
    """Re-reads tensors we do not use (vision tower) so that they survive a save."""
    wanted = set(items)
    for f, key, load, _ in iter_tensors(sorted({f for f, _ in items})):
        if (f, key) in wanted:
            yield key, load()


def parse_size(text: str | int) -> int:
    """'5GB' / '200MB' / '64KB' / bytes -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?i?B)?\s*", text, re.I)
    if not m:
        raise ValueError(f"max_shard_size={text!r}: expected e.g. '5GB', '500MB' or a number of bytes")
    unit = (m.group(2) or "B").upper().replace("I", "")
    return int(float(m.group(1)) * {"B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30}[unit])


__all__ = ["CheckpointError", "load_params", "write_checkpoint", "iter_hf_tensors", "tensor_specs"]
