"""The attention back ends side by side at one layer's real shapes: XLA's against the GPU kernel.

Run on the GPU machine (from the repository root):

    PYTHONPATH=. python bench/attention.py                                   # 26B-A4B: both layer types
    PYTHONPATH=. python bench/attention.py --config configs/model/bench.py   # a small CPU smoke run

For each layer type of ``--config`` (sliding, head dim 256; full, head dim 512), pass (``canvas``: the
denoising pass over a cache of ``--context`` filled slots plus the canvas; ``causal``: the encoder
pass of a committed canvas after them) and batch (``--canvases``), one attention call on random
bf16 inputs, jitted, the median of ``--repeats`` runs:
  xla         ``dgemma_jax.attention`` with ``attention_impl="xla"``: the cache | canvas concatenation,
              dense masks, float32 scores written out and read back
  pallas_gpu  ``pallas_kernels.attention_gpu`` (Triton; interpreted off GPU, so slow there)
Each output is checked against ``xla`` before it is timed; a line per case names the fastest. The
floor is the bytes the pass must read (queries, the keys and values its mask reaches) and write (the
output) over the device's measured copy bandwidth.

``--blocks`` (default: the defaults and one change of them at a time, on GPU; only the defaults
elsewhere) times the kernel under each ``GpuBlocks``, written ``q=32,num_warps=8``, one per argument.
"""

from __future__ import annotations

import argparse
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMPLS = ("xla", "pallas_gpu")
# one change at a time around GpuBlocks' defaults
GPU_BLOCKS = ("default", "q=32", "k=32", "num_warps=4,q=32", "num_stages=1", "num_stages=3")


def parse_blocks(text: str):
    """``q=32,num_warps=8`` (or ``default``) -> ``GpuBlocks``."""
    from bench.moe import parse_settings
    from pallas_kernels.attention_gpu import GpuBlocks

    return parse_settings(text, GpuBlocks, "--blocks")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "model", "diffusiongemma_26b_a4b.py"))
    p.add_argument("--canvases", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--context", type=int, default=1024, help="filled cache slots before the canvas")
    p.add_argument("--passes", default="canvas,causal")
    p.add_argument("--blocks", nargs="+", default=None, help="GpuBlocks to time the kernel under")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from bench.gpu_step import copy_bandwidth, median_seconds
    from dgemma_jax.attention import attend_canvas, attend_causal
    from dgemma_jax.config import SLIDING
    from dgemma_jax.configs_io import load_model_config

    config = load_model_config(args.config)
    names = args.blocks or (GPU_BLOCKS if jax.default_backend() == "gpu" else ("default",))
    blocks = {name: parse_blocks(name) for name in names}
    bandwidth = copy_bandwidth()
    print(f"config {os.path.relpath(args.config, ROOT)} | bf16 | {config.num_heads} heads, canvas "
          f"{config.canvas_length}, context {args.context} | device {jax.devices()[0].device_kind} | copy bandwidth "
          f"{bandwidth / 1e9:.0f} GB/s")
    print(f"{'layer':>8}{'pass':>8}{'batch':>6}{'impl':>28}{'ms':>10}{'x floor':>9}")
    rng = np.random.default_rng(0)
    failures = []
    for layer_type in sorted(set(config.layer_types)):
        d, kh = config.layer_head_dim(layer_type), config.layer_kv_heads(layer_type)
        window = config.sliding_window if layer_type == SLIDING else None
        for kind in args.passes.split(","):
            for b in args.canvases:
                length, context = config.canvas_length, args.context
                normal = lambda *shape: jnp.asarray(rng.standard_normal(shape) / np.sqrt(np.sqrt(d)),  # noqa: E731
                                                    jnp.bfloat16)
                q = normal(b, length, config.num_heads, d)
                slots = context + (length if kind == "causal" else 0)  # causal: the canvas is in the cache
                keys, values = normal(b, kh, slots, d), normal(b, kh, slots, d)
                k, v = normal(b, kh, length, d), normal(b, kh, length, d)
                offsets = jnp.full((b,), context, jnp.int32)
                seen = min(context, window - 1) if window else context  # cache slots the mask reaches
                floor = (2 * q.nbytes + 2 * b * kh * (seen + length) * d * 2) / bandwidth

                def attention(impl, settings=None):
                    if kind == "canvas":
                        f = lambda q, keys, values, k, v, offsets: attend_canvas(  # noqa: E731
                            q, keys, values, k, v, offsets, window, impl, blocks=settings)
                        return jax.jit(f), (q, keys, values, k, v, offsets)
                    f = lambda q, keys, values, offsets: attend_causal(  # noqa: E731
                        q, keys, values, offsets, window, impl, blocks=settings)
                    return jax.jit(f), (q, keys, values, offsets)

                run, inputs = attention("xla")
                reference = np.asarray(run(*inputs), np.float32)
                cases = [("xla", run)] + [(f"pallas_gpu {name}", attention("pallas_gpu", setting)[0])
                                          for name, setting in blocks.items()]
                label = f"{layer_type.split('_')[0]:>8}{kind:>8}{b:>6}"
                timed = []
                for name, run in cases:
                    try:
                        out = np.asarray(run(*inputs), np.float32)
                    except Exception as e:  # a kernel that does not compile here: report it, time the others
                        failures.append(f"{label.split()} {name}: {type(e).__name__}: {str(e).splitlines()[0]}")
                        print(f"{label}{name:>28}    failed: {failures[-1]}", flush=True)
                        continue
                    err = np.abs(out - reference).max() / np.abs(reference).max()
                    if err > 2e-2:  # bf16 inputs and outputs
                        failures.append(f"{label.split()} {name}: output differs from xla's by {err:.2e}")
                        print(f"{label}{name:>28}    wrong, not timed: {failures[-1]}", flush=True)
                        continue
                    seconds = median_seconds(lambda: run(*inputs).block_until_ready(), args.repeats, lambda: None)
                    timed.append((seconds, name))
                    print(f"{label}{name:>28}{seconds * 1e3:>10.3f}{seconds / floor:>9.2f}", flush=True)
                if timed:
                    seconds, name = min(timed)
                    print(f"fastest for {layer_type.split('_')[0]} {kind} at batch {b}: {name} "
                          f"({seconds * 1e3:.3f} ms)")
    for failure in failures:
        print(f"FAILED: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
