"""The MoE formulations side by side at one layer's real shapes: which back end ``auto`` should pick.

Run on the GPU machine (from the repository root):

    PYTHONPATH=. python bench/moe.py                                   # 26B-A4B layer: 128 experts, top-8
    PYTHONPATH=. python bench/moe.py --config configs/model/bench.py   # a small CPU smoke run

One MoE layer (routing included) of ``--config`` with random weights in ``--dtype``, on
``--canvases`` x canvas-length tokens (default 1 4 16: batch 1, 4 and 16 canvases), forward only
(serving), jitted; the median of ``--repeats`` runs per back end:
  ragged    sort by expert + ``jax.lax.ragged_dot`` grouped matmuls
  bucketed  sort by expert into an [E, C, H] capacity layout (C: a power of two holding the largest
            group, chosen at run time; never drops a token) + batched einsums
  pallas_gpu  sort by expert + the two Pallas (Triton) kernels of ``pallas_kernels.expert_ffn``
            (interpreted off GPU, so slow there)
  tiled     sort + segment: one loop over experts, small matmuls over each expert's filled tiles
  dense     every token through every expert (the reference; skipped above ``--dense-max`` tokens)
each also with int8 experts (``dgemma_jax.quant``). The floor is the expert bytes the layer reads
(every expert a batch routes to) over the device's measured copy bandwidth. Each back end's output
is checked against ``dense`` (or ``ragged`` where dense is skipped) before it is timed. The last
lines name the fastest per size: the GPU default (``moe.resolve_impl``) should be the one that
wins at serving sizes.

``--tilings`` (default: the default tiling and one change of it at a time, on GPU; none elsewhere)
also times the ``pallas_gpu`` kernels alone, on the rows of that batch already sorted by expert,
under each ``GpuTiling``; written ``bm=16,bk=256,num_warps=8``, one tiling per argument, ``default``
for the defaults. The fastest is the one to make ``GpuTiling``'s default.
"""

from __future__ import annotations

import argparse
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMPLS = ("ragged", "bucketed", "pallas_gpu", "tiled", "dense")
# one change at a time around GpuTiling's defaults (bm: None = from the average group size)
GPU_TILINGS = ("default", "bm=16", "bm=32", "bn=32", "bk=256", "bn_down=64", "bk_down=128", "num_warps=8",
               "num_stages=2", "num_stages=4", "visits_inner=1")


def parse_settings(text: str, cls, option: str):
    """``bm=16,num_warps=8`` (or ``default``) -> ``cls(bm=16, num_warps=8)``, a dataclass of int fields;
    a clear error naming ``option`` for an unknown field."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(cls)} - {"interpret"}
    values = {}
    for item in filter(None, text.split(",")) if text != "default" else ():
        name, _, value = item.partition("=")
        if name not in fields or not value.isdigit():
            raise SystemExit(f"{option} {text!r}: {item!r} is not NAME=INT with NAME one of "
                             f"{', '.join(sorted(fields))}")
        values[name] = int(value)
    return cls(**values)


def parse_tiling(text: str):
    """``bm=16,num_warps=8`` (or ``default``) -> ``GpuTiling``."""
    from pallas_kernels.expert_ffn import GpuTiling

    return parse_settings(text, GpuTiling, "--tilings")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "model", "diffusiongemma_26b_a4b.py"))
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--canvases", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--quantize", default="none,int8")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--dense-max", type=int, default=1024, help="largest token count dense runs at")
    p.add_argument("--tilings", nargs="*", default=None, help="GpuTiling variants of the pallas_gpu kernels to time")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from bench.gpu_step import copy_bandwidth, median_seconds
    from dgemma_jax import quant
    from dgemma_jax.configs_io import load_model_config
    from dgemma_jax.moe import MoE

    config = load_model_config(args.config)
    if args.tilings is None:
        args.tilings = GPU_TILINGS if jax.default_backend() == "gpu" else ()
    tilings = {name: parse_tiling(name) for name in args.tilings}  # as written -> GpuTiling
    dtype = jnp.dtype(args.dtype)
    layers = {mode: quant.quantize(MoE(config, rngs=nnx.Rngs(0), dtype=dtype), mode)
              for mode in args.quantize.split(",")}
    bandwidth = copy_bandwidth()
    print(f"config {os.path.relpath(args.config, ROOT)} | {args.dtype} | {config.num_experts} experts, top-"
          f"{config.num_experts_per_tok}, H {config.hidden_size}, I {config.moe_intermediate_size} | device "
          f"{jax.devices()[0].device_kind} | copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    print(f"{'tokens':>7}{'weights':>8}{'impl':>12}{'ms':>10}{'x floor':>9}")
    rng = np.random.default_rng(0)
    failures = []  # back ends or tilings that failed to compile or gave a wrong result
    for canvases in args.canvases:
        n = canvases * config.canvas_length
        x = jnp.asarray(rng.standard_normal((1, n, config.hidden_size)), dtype)
        best = {}
        for mode, module in layers.items():
            graphdef, state = nnx.split(module)

            def forward(impl):
                def run(state, x):
                    layer = nnx.merge(graphdef, state)
                    layer.config = layer.config.replace(moe_impl=impl)  # static: one program per impl
                    return layer(x, x)
                return jax.jit(run)

            used = np.unique(np.asarray(module.route(x[0])[1]))  # experts this batch reads
            expert_bytes = sum(getattr(module, w)[...][0].nbytes for w in ("gate", "up", "down")) * len(used)
            floor = expert_bytes / bandwidth
            reference = np.asarray(forward("dense" if n <= args.dense_max else "ragged")(state, x), np.float32)
            for impl in args.impls.split(","):
                if impl == "dense" and n > args.dense_max:
                    continue
                run = forward(impl)
                try:
                    err = np.abs(np.asarray(run(state, x), np.float32) - reference).max() / np.abs(reference).max()
                except Exception as e:  # a kernel that does not compile here: report it, time the others
                    failures.append(f"{n} tokens, {mode}, {impl}: {type(e).__name__}: {str(e).splitlines()[0]}")
                    print(f"{n:>7}{mode:>8}{impl:>12}    failed: {failures[-1]}", flush=True)
                    continue
                if err > (2e-2 if args.dtype == "bfloat16" else 1e-4):
                    failures.append(f"{n} tokens, {mode}, {impl}: output differs from the reference by {err:.2e}")
                    print(f"{n:>7}{mode:>8}{impl:>12}    wrong, not timed: {failures[-1]}", flush=True)
                    continue
                seconds = median_seconds(lambda: run(state, x).block_until_ready(), args.repeats, lambda: None)
                best.setdefault(mode, []).append((seconds, impl))
                print(f"{n:>7}{mode:>8}{impl:>12}{seconds * 1e3:>10.3f}{seconds / floor:>9.2f}", flush=True)
            if tilings:
                failures += time_tilings(module, x[0], tilings, floor, args.repeats, f"{n:>7}{mode:>8}")
        for mode, times in best.items():
            seconds, impl = min(times)
            print(f"fastest at {n} tokens, {mode} weights: {impl} ({seconds * 1e3:.3f} ms)")
    for failure in failures:
        print(f"FAILED: {failure}")
    return 1 if failures else 0


def time_tilings(module, x, tilings: dict, floor: float, repeats: int, prefix: str) -> list[str]:
    """The ``pallas_gpu`` kernels alone on ``x`` [N, H]'s rows sorted by expert (gathered by the token
    index and stored in (token, expert) order, as the MoE layer calls them), per tiling (name as
    written -> ``GpuTiling``), each checked against the first that ran -> the tilings that failed to
    compile or disagreed."""
    import jax
    import numpy as np

    from bench.gpu_step import median_seconds
    from dgemma_jax.moe import _sort_by_expert
    from pallas_kernels.expert_ffn import expert_ffn

    experts = [getattr(module, name)[...] for name in ("gate", "up", "down")]
    scales = [None if v is None else v[...] for v in (module.gate_scale, module.up_scale, module.down_scale)]
    _, ids = module.route(x)
    order, token, _, sizes = _sort_by_expert(ids, module.config.num_experts)
    inputs = (x, token, order, sizes, (*experts, *scales))
    reference, failures = None, []
    label = "{} tokens, {}".format(*prefix.split())
    for name, tiling in tilings.items():
        run = jax.jit(lambda x, token, order, sizes, w, t=tiling: expert_ffn(x, sizes, *w, row_index=token,
                                                                            out_index=order, tiling=t))
        try:
            y = np.asarray(run(*inputs), np.float32)
        except Exception as e:
            failures.append(f"{label}, kernels {name}: {type(e).__name__}: {str(e).splitlines()[0]}")
            print(f"{prefix}  kernels: {name:<16}    failed: {failures[-1]}", flush=True)
            continue
        reference = y if reference is None else reference
        if not np.allclose(y, reference, rtol=2e-2, atol=2e-2 * np.abs(reference).max()):
            failures.append(f"{label}, kernels {name}: output differs from the first tiling's")
            print(f"{prefix}  kernels: {name:<16}    wrong, not timed", flush=True)
            continue
        seconds = median_seconds(lambda: run(*inputs).block_until_ready(), repeats, lambda: None)
        print(f"{prefix}  kernels: {name:<16}{seconds * 1e3:>10.3f}{seconds / floor:>9.2f}", flush=True)
    return failures


if __name__ == "__main__":
    raise SystemExit(main())
