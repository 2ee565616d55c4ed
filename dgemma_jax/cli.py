"""The ``dgemma`` command line.

Only subcommands that work are registered, so ``dgemma --help`` lists what exists today.
Expected failures (bad paths, bad checkpoints or configs) print ``dgemma: error: <message>`` to
stderr and exit with status 1, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

PROG = "dgemma"
_DTYPES = ("bfloat16", "float32")


class CLIError(Exception):
    """A user-facing error raised by a subcommand."""


# ---- dgemma convert ----------------------------------------------------------------------------


def _source_dtype(src: Path) -> str | None:
    """The dtype a snapshot records in config.json (``dtype`` or older ``torch_dtype``), if any."""
    try:
        raw = json.loads((src / "config.json").read_text())
    except (OSError, ValueError):
        return None  # from_pretrained reports the real problem
    for key in ("dtype", "torch_dtype"):
        value = raw.get(key) or (raw.get("text_config") or {}).get(key)
        if isinstance(value, str):
            return value.removeprefix("torch.")
    return None


def _check_destination(src: Path, dst: Path, overwrite: bool) -> None:
    if dst.exists() and not dst.is_dir():
        raise CLIError(f"{dst}: exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()):
        if dst.resolve() == src.resolve():
            if not overwrite:
                raise CLIError(f"{dst}: is the source directory; pass --overwrite to convert in place")
            return
        if not overwrite:
            raise CLIError(f"{dst}: exists and is not empty; pass --overwrite to replace it")
        if not (dst / "config.json").is_file():
            # The write replaces the whole directory: never do that to something that is not a checkpoint.
            raise CLIError(f"{dst}: exists but holds no config.json; refusing to replace it")


def cmd_convert(args: argparse.Namespace) -> int:
    import dgemma_jax

    src, dst = Path(args.src), Path(args.dst)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: not a directory (expected a Hugging Face snapshot)")
    _check_destination(src, dst, args.overwrite)
    dtype = args.dtype
    if dtype is None:
        recorded = _source_dtype(src)
        dtype = recorded if recorded in _DTYPES else "bfloat16"
        if recorded and recorded not in _DTYPES:
            print(f"{PROG}: note: {src} records dtype {recorded}; writing bfloat16 (use --dtype to choose)",
                  file=sys.stderr)
    model = dgemma_jax.from_pretrained(src, dtype=dtype, progress=not args.quiet)
    if args.to == "orbax":
        out = model.save_orbax(dst)
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        print(f"wrote {out}: orbax checkpoint, {_human_bytes(size)}, dtype {dtype}")
        return 0
    out = model.save_pretrained(dst, max_shard_size=args.max_shard_size, progress=not args.quiet)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    size = sum((out / f).stat().st_size for f in files)
    print(f"wrote {out}: {len(files)} safetensors file(s), {_human_bytes(size)}, dtype {dtype}")
    return 0


# ---- dgemma info -------------------------------------------------------------------------------


def _param_counts(config) -> tuple[int, int]:
    """(total text parameters, parameters active per token) from the tensor shapes of ``config``."""
    from dgemma_jax import checkpoint

    total = sum(_prod(s.hf_shape) for s in checkpoint.tensor_specs(config))
    per_expert = 3 * config.hidden_size * config.moe_intermediate_size  # gate, up, down
    idle = (config.num_experts - config.num_experts_per_tok) * per_expert * config.num_layers
    return total, total - idle


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _human_count(n: int) -> str:
    for unit, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _human_bytes(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def cmd_info(args: argparse.Namespace) -> int:
    from dgemma_jax.config import FULL, load_hf_config
    from dgemma_jax.configs_io import load_model_config

    path = Path(args.path)
    if path.is_dir():
        config, raw = load_hf_config(path)
        kind = "Hugging Face snapshot"
    elif path.is_file():
        config, raw = load_model_config(path), None
        kind = "config file"
    else:
        raise FileNotFoundError(f"{path}: no such file or directory (expected a snapshot directory or a config .py)")
    total, active = _param_counts(config)
    n_full = sum(lt == FULL for lt in config.layer_types)
    lines = [
        f"{path} ({kind})",
        f"  layers       {config.num_layers} ({config.num_layers - n_full} sliding, {n_full} full; "
        f"window {config.sliding_window})",
        f"  hidden       {config.hidden_size} (dense MLP {config.intermediate_size})",
        f"  attention    {config.num_heads} heads; sliding {config.num_kv_heads} kv x {config.head_dim}, "
        f"full {config.num_global_kv_heads} kv x {config.global_head_dim}",
        f"  experts      {config.num_experts} x {config.moe_intermediate_size}, top-{config.num_experts_per_tok}",
        f"  vocab        {config.vocab_size}; canvas {config.canvas_length}; eos {list(config.eos_token_ids)}",
        f"  parameters   {_human_count(total)} text ({total:,}), {_human_count(active)} active per token",
    ]
    if raw is not None:
        dtype = _source_dtype(path) or "unknown"
        files = sorted(path.glob("*.safetensors"))
        size = sum(f.stat().st_size for f in files)
        lines.append(f"  weights      {len(files)} safetensors file(s), {_human_bytes(size)}, dtype {dtype}")
    print("\n".join(lines))
    return 0


# ---- parser and entry point --------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="DiffusionGemma (block-autoregressive text diffusion, MoE) in JAX.",
    )
    from dgemma_jax import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "convert",
        help="convert between Hugging Face safetensors and our orbax format (validates every tensor)",
        description=(
            "Load SRC (a Hugging Face snapshot, or our orbax format) and write it to DST as a Hugging "
            "Face snapshot (--to hf, the default; optionally re-cast and re-sharded) or in our orbax "
            "format (--to orbax: the text model only; restores shard by shard onto a device mesh). Loading an HF snapshot "
            "validates every tensor: names, shapes and that tied "
            "encoder/decoder copies agree. Tokenizer, generation and chat-template files are copied; "
            "vision-tower tensors are carried over unchanged. The write is atomic."
        ),
    )
    p.add_argument("src", metavar="SRC", help="Hugging Face snapshot directory to read")
    p.add_argument("dst", metavar="DST", help="output directory")
    p.add_argument("--dtype", choices=_DTYPES, default=None,
                   help="parameter dtype to write (default: the source's dtype if bfloat16/float32, else bfloat16)")
    p.add_argument("--max-shard-size", default="5GB",
                   help="largest safetensors file, e.g. 5GB, 500MB (default: %(default)s); "
                        "more than one file adds model.safetensors.index.json")
    p.add_argument("--to", choices=("hf", "orbax"), default="hf", help="output format (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace DST if it already holds a checkpoint")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "info",
        help="summarise a checkpoint or a model config file",
        description="Print layers, sizes, experts and parameter counts of a Hugging Face snapshot "
                    "directory or of a configs/model/*.py file. Reads config.json only, not the weights.",
    )
    p.add_argument("path", metavar="PATH", help="snapshot directory or config .py file")
    p.set_defaults(func=cmd_info)

    from dgemma_jax import cli_text

    cli_text.add_parsers(sub)
    from dgemma_jax import cli_train

    cli_train.add_parsers(sub)
    from dgemma_jax import cli_plan

    cli_plan.add_parsers(sub)
    from dgemma_jax import cli_serve

    cli_serve.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    from dgemma_jax.checkpoint import CheckpointError
    from dgemma_jax.config import ConfigError

    try:
        return int(args.func(args) or 0)
    except (CLIError, CheckpointError, ConfigError, ValueError, OSError) as e:
        print(f"{PROG}: error: {_message(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def _message(e: BaseException) -> str:
    text = str(e)
    if isinstance(e, OSError) and e.filename and str(e.filename) not in text:
        text = f"{e.filename}: {text}"
    return text or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
