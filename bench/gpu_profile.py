"""Where one denoise step's time goes on the device: a profiler trace of the canvas pass, summed by op.

Run on the GPU machine (from the repository root):

    PYTHONPATH=. python bench/gpu_profile.py                 # 26B-A4B widths, first 6 layers
    PYTHONPATH=. python bench/gpu_profile.py --config configs/model/bench.py --dtype float32  # CPU smoke run

The model is ``--config`` cut to its first ``--layers`` layers (one sliding block and its full layer by
default: every per-layer cost of the full model, at a fraction of its compile time), with random
weights (``bench.gpu_step.random_model``). Per batch size: the median step time, then ``--traced``
steps under ``jax.profiler``; the trace's device events are summed per op name. Printed per batch:
wall ms per step, device-busy ms per step (op time summed over the GPU's streams) and their
difference (launch gaps, host round trips such as a ``lax.cond`` predicate), the busiest lines,
then the ``--top`` ops by time. Everything
measured per step scales with the layer count; embedding and logits do not.

The wall time is measured untraced, as the program runs in serving: XLA launches a pass as CUDA
graphs (``dgemma plan --topology h100`` counts them). Under the profiler XLA launches each kernel on
its own (``--xla_enable_command_buffers_during_profiling`` is false by default), which changes the
gaps between kernels, not their times. To see what the graphs save, run it again with
``XLA_FLAGS=--xla_gpu_enable_command_buffer=`` (no graphs) and compare the wall times.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def device_events(trace_dir: str, plane_prefix: str):
    """(line name, op name, duration ns) of every event on the trace's planes named ``plane_prefix``...
    ("/device:" for accelerators; on CPU the ops run on "/host:CPU" threads)."""
    from jax.profiler import ProfileData

    for path in glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True):
        for plane in ProfileData.from_file(path).planes:
            if plane.name.startswith(plane_prefix):
                for line in plane.lines:
                    for event in line.events:
                        yield line.name, event.name, event.duration_ns


def summarize(events, steps: int, top: int) -> dict:
    """Device time per step: per trace line, and the ``top`` op names over the busy lines.

    The busy lines are the GPU's streams ("Stream #..."): XLA runs a conditional's branches on
    streams of their own, so one stream alone misses them (streams that overlap in time count twice).
    Without streams (CPU), the busiest line."""
    by_line = collections.defaultdict(collections.Counter)
    counts = collections.Counter()
    for line, name, ns in events:
        by_line[line][name] += ns
        counts[line] += 1
    lines = {line: sum(ops.values()) / steps / 1e6 for line, ops in by_line.items()}
    busy_lines = [line for line in lines if line.startswith("Stream")] or (
        [max(lines, key=lines.get)] if lines else [])
    ops = sum((by_line[line] for line in busy_lines), collections.Counter())
    grouped = collections.Counter()
    for name, ns in ops.items():
        grouped[re.sub(r"[._]\d+$", "", name)] += ns  # fusion.12, fusion.40 -> fusion
    return dict(lines=lines, busy_lines=busy_lines, busy_ms=sum(lines[line] for line in busy_lines),
                ops_per_step=sum(counts[line] for line in busy_lines) / steps,
                top=[(name, ns / steps / 1e6) for name, ns in ops.most_common(top)],
                grouped=[(name, ns / steps / 1e6) for name, ns in grouped.most_common(top)])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "model", "diffusiongemma_26b_a4b.py"))
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--quantize", default="none", choices=("none", "int8"))
    p.add_argument("--moe-impl", default="auto")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--traced", type=int, default=5)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", default=None, help="write the full summary as JSON here")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from bench.gpu_step import denoise_pass, median_seconds, random_model
    from dgemma_jax.configs_io import load_model_config

    full = load_model_config(args.config)
    config = full.replace(layer_types=full.layer_types[:args.layers], moe_impl=args.moe_impl)
    dtype = jnp.dtype(args.dtype)
    graphdef, state = random_model(config, dtype, args.quantize)
    rng = np.random.default_rng(0)
    print(f"config {os.path.relpath(args.config, ROOT)}, first {config.num_layers} of {full.num_layers} layers | "
          f"{args.dtype} | experts {args.quantize} | moe {args.moe_impl} | context {args.context} | "
          f"device {jax.devices()[0].device_kind}")
    plane = "/host:CPU" if jax.default_backend() == "cpu" else "/device:"
    report = {}
    for b in args.batch:
        run, _ = denoise_pass(graphdef, state, config, dtype, b, args.context, rng)
        step = median_seconds(run, args.repeats, lambda: None)
        with tempfile.TemporaryDirectory() as trace_dir:
            jax.profiler.start_trace(trace_dir)
            for _ in range(args.traced):
                run()
            jax.profiler.stop_trace()
            summary = summarize(device_events(trace_dir, plane), args.traced, args.top)
        busy = summary["busy_ms"]
        report[b] = dict(step_ms=step * 1e3, **summary)
        print(f"\nbatch {b}: step {step * 1e3:.2f} ms wall | {busy:.2f} ms busy on {len(summary['busy_lines'])} "
              f"line(s) ({summary['ops_per_step']:.0f} ops) | {step * 1e3 - busy:.2f} ms idle")
        for line, ms in sorted(summary["lines"].items(), key=lambda kv: -kv[1])[:6]:
            print(f"  line {line[:60]:<60} {ms:9.3f} ms")
        print(f"  {'op (numbering folded)':<60} {'ms/step':>9} {'share':>6}")
        for name, ms in summary["grouped"]:
            print(f"  {name[:60]:<60} {ms:9.3f} {ms / max(busy, 1e-9):6.1%}")
        print(f"  {'op':<60} {'ms/step':>9}")
        for name, ms in summary["top"][:10]:
            print(f"  {name[:60]:<60} {ms:9.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main())
