"""``dgemma plan``: per-chip memory and cost of the model's compiled programs, without weights."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "model" / "diffusiongemma_26b_a4b.py"


def parse_mesh(text: str) -> dict[str, int]:
    """``"fsdp=2,expert=4"`` -> {"fsdp": 2, "expert": 4}; ValueError naming the bad part."""
    shape = {}
    for part in text.split(","):
        name, _, size = part.partition("=")
        if not name.strip() or not size.strip().isdigit() or int(size) < 1:
            raise ValueError(f"--mesh {text!r}: expected AXIS=SIZE[,AXIS=SIZE...] (e.g. expert=8), not {part!r}")
        shape[name.strip()] = int(size)
    return shape


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "plan", help="compile the model's programs for a mesh (e.g. a TPU v5e topology or an H100) and print "
                     "memory/cost",
        description="Ahead-of-time compile the canvas step, the denoising loop and a LoRA train step with "
                    "abstract weights (nothing is allocated), for a TPU topology (needs jax[tpu]; no TPU), "
                    "H100s (needs jax's CUDA plugin; no GPU) or this machine's devices, and print per-chip "
                    "memory, XLA's cost estimate, the weight-read floor, the communication volume, the "
                    "device programs launched per pass and, on GPU, the CUDA graphs they run in.")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="a configs/model/*.py file "
                   "(default: the 26B-A4B config)")
    p.add_argument("--topology", default=None, help="topology to compile for: TPU v5e:2x4, v5e:4x4, v5e:8x8, or "
                   "h100, h100:8 (GPUs on one host) (default: this machine's devices)")
    p.add_argument("--mesh", default="expert=8", help="mesh axes AXIS=SIZE,... over the devices "
                   "(data, fsdp, expert, tensor; default: %(default)s)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=4096, help="KV-cache positions / training tokens per row")
    p.add_argument("--programs", default="canvas,loop,train", help="any of canvas, loop, train (default: %(default)s)")
    p.add_argument("--steps", type=int, default=16, help="denoising passes in the loop program")
    p.add_argument("--moe-impl", default="auto", help="MoE back end (auto: pallas on TPU, bucketed on GPU)")
    p.add_argument("--attention-impl", default=None, help="attention back end (default: pallas for a TPU "
                   "topology, else xla)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--quantize", choices=("none", "int8"), default="none",
                   help="int8: the serving programs with int8 experts (default: %(default)s)")
    p.add_argument("--weight-layouts", choices=("xla", "default"), default="xla",
                   help="the loop's weights and the train step's frozen base weights in the layouts XLA picks, "
                        "as `dgemma serve` and `dgemma train` place them on TPU, or as they arrive "
                        "(default: %(default)s)")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.set_defaults(func=cmd_plan)


def cmd_plan(args) -> int:
    from dgemma_jax.configs_io import load_model_config
    from dgemma_jax.plan import HEADER, PROGRAMS, is_gpu_topology, plan

    programs = tuple(x.strip() for x in args.programs.split(",") if x.strip())
    unknown = set(programs) - set(PROGRAMS)
    if unknown:
        raise ValueError(f"--programs: unknown {sorted(unknown)}; expected any of {', '.join(PROGRAMS)}")
    gpu = is_gpu_topology(args.topology)
    if gpu:  # compile-only GPU devices need JAX's CUDA plugin left out of the runtime backends
        import jax

        jax.config.update("jax_platforms", "cpu")
    attention = args.attention_impl or ("pallas" if args.topology and not gpu else "xla")
    config = load_model_config(args.config).replace(moe_impl=args.moe_impl, attention_impl=attention)
    print(f"config {args.config} | topology {args.topology or 'this machine'} | {args.dtype}")
    print(HEADER, flush=True)
    rows = plan(config, parse_mesh(args.mesh), topology=args.topology, batch=args.batch, context=args.context,
                programs=programs, dtype=args.dtype, steps=args.steps, quantize=args.quantize,
                weight_layouts=args.weight_layouts,
                progress=lambda line: print(line, flush=True))
    if args.json:
        Path(args.json).write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=2) + "\n")
    return 0
