"""The ``pallas_gpu`` kernels compiled down to an H100's machine code, on a machine without a GPU.

Run (from the repository root; needs the ``triton`` package: ``pip install -e ".[triton]"``):

    PYTHONPATH=. python bench/triton_compile.py            # every GpuTiling and GpuBlocks of the sweeps
    PYTHONPATH=. python bench/triton_compile.py --canvases 1 --tilings default --blocks default
    PYTHONPATH=. python bench/triton_compile.py --kernels attention

``--kernels moe``: for each batch (``--canvases`` x 256 tokens, top-8 of the 26B layer's 128
experts), weight type (``--quantize``) and ``GpuTiling`` (``--tilings``, default bench/moe.py's
sweep), the two expert kernels. ``--kernels attention``: for each ``GpuBlocks`` (``--blocks``,
default bench/attention.py's sweep), layer type (sliding, head dim 256; full, 512), batch and pass
(canvas over ``--context`` cache slots, causal), the attention kernel. Each is lowered for CUDA as
jax does (Pallas -> Triton IR, in the XLA custom call), then that Triton IR goes through upstream
Triton (``triton.compile`` for sm_90) and ptxas (``-v``). Printed per kernel: the grid, warps,
pipeline stages, shared memory, registers per thread and spilled bytes. A kernel that fails to
compile, needs more shared memory than a block may have (227 KiB) or spills registers is flagged,
and the exit code is 1.

What it shows is whether a tiling can run and what it costs in on-chip resources, not its speed.
XLA compiles the same Triton IR with the Triton it bundles, whose passes may differ in details from
the upstream release used here.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_LIMIT = 227 * 1024  # bytes of shared memory one block may use on an H100


def triton_modules(lowered) -> list[tuple[str, int, int, str, str]]:
    """The Triton custom calls of a lowered jax program -> (name, warps, stages, grid, Triton IR text)."""
    from jax._src.lib.mlir import ir
    from jaxlib.triton import dialect

    found = []

    def walk(op):
        for region in op.regions:
            for block in region:
                for inner in block:
                    if inner.name == "stablehlo.custom_call" and "triton" in str(inner.attributes["call_target_name"]):
                        config = inner.attributes["mhlo.backend_config"]
                        sizes = [config[f"grid_{a}"].value for a in "xyz"]
                        grid = "x".join(map(str, sizes if sizes[2] > 1 else sizes[:2]))
                        with ir.Context() as ctx, ir.Location.unknown():
                            dialect.register_dialect(ctx)
                            text = ir.Module.parse(config["ir"].value_bytes).operation.get_asm(enable_debug_info=False)
                        found.append((config["name"].value, config["num_warps"].value, config["num_stages"].value,
                                      grid, text))
                    walk(inner)

    walk(lowered.compiler_ir("stablehlo").operation)
    return found


def compile_for_gpu(text: str, warps: int, stages: int, arch: int) -> dict:
    """Triton IR text -> shared bytes, registers and spilled bytes of its sm_``arch`` machine code."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "kernel.ttir")
        with open(source, "w") as f:
            f.write(text)
        kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                options=dict(num_warps=warps, num_stages=stages))
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        report = subprocess.run([get_ptxas(arch).path, f"-arch=sm_{arch}a", "-v", ptx, "-o", os.devnull],
                                capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spilled = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", report))
    return dict(shared=kernel.metadata.shared, registers=registers, spilled=spilled)


def moe_cases(config, args):
    """-> (label, jitted function, argument shapes) of the expert kernels per batch, weight type and tiling,
    called as the MoE layer calls them: the rows gathered from the tokens by their row index and stored
    in (token, expert) order."""
    import jax
    import jax.numpy as jnp

    from bench.moe import parse_tiling
    from pallas_kernels.expert_ffn import expert_ffn

    e, hidden, width = config.num_experts, config.hidden_size, config.moe_intermediate_size
    s = jax.ShapeDtypeStruct
    for canvases in args.canvases:
        n = canvases * config.canvas_length
        m = n * config.num_experts_per_tok
        for mode in args.quantize.split(","):
            dtype = jnp.int8 if mode == "int8" else jnp.bfloat16
            shapes = [s((n, hidden), jnp.bfloat16), s((m,), jnp.int32), s((m,), jnp.int32), s((e,), jnp.int32),
                      s((e, hidden, width), dtype), s((e, hidden, width), dtype), s((e, width, hidden), dtype)]
            if mode == "int8":
                shapes += [s((e, width), jnp.float32), s((e, width), jnp.float32), s((e, hidden), jnp.float32)]
            for name in args.tilings:
                tiling = dataclasses.replace(parse_tiling(name), interpret=False)
                run = jax.jit(lambda x, index, order, *a, t=tiling: expert_ffn(x, *a, row_index=index,
                                                                               out_index=order, tiling=t))
                yield f"{m} rows {mode} {name}", run, shapes


def attention_cases(config, args):
    """-> (label, jitted function, argument shapes) of the attention kernel per layer type, pass and batch
    (a canvas over ``--context`` cache slots)."""
    import jax
    import jax.numpy as jnp

    from bench.attention import parse_blocks
    from dgemma_jax.config import SLIDING
    from pallas_kernels.attention_gpu import gpu_attention

    s = jax.ShapeDtypeStruct
    for name, layer_type in itertools.product(args.blocks, sorted(set(config.layer_types))):
        blocks = dataclasses.replace(parse_blocks(name), interpret=False)
        d, kh = config.layer_head_dim(layer_type), config.layer_kv_heads(layer_type)
        window = config.sliding_window if layer_type == SLIDING else None
        for canvases in args.canvases:
            b, length = canvases, config.canvas_length
            q = s((b, length, config.num_heads, d), jnp.bfloat16)
            cache = s((b, kh, args.context, d), jnp.bfloat16)
            offsets = s((b,), jnp.int32)
            canvas = lambda q, keys, values, offsets, k, v, w=window: gpu_attention(  # noqa: E731
                q, keys, values, offsets, kind="canvas", window=w, canvas=(k, v), blocks=blocks)
            causal = lambda q, keys, values, offsets, w=window: gpu_attention(  # noqa: E731
                q, keys, values, offsets, kind="causal", window=w, blocks=blocks)
            kv = s((b, kh, length, d), jnp.bfloat16)
            label = f"{layer_type.split('_')[0]} D{d} b{b} {name}"
            yield f"{label} canvas", jax.jit(canvas), [q, cache, cache, offsets, kv, kv]
            yield f"{label} causal", jax.jit(causal), [q, cache, cache, offsets]


def main(argv=None) -> int:
    from bench.attention import GPU_BLOCKS
    from bench.moe import GPU_TILINGS

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "model", "diffusiongemma_26b_a4b.py"))
    p.add_argument("--kernels", default="moe,attention", help="which: moe (expert_ffn), attention (attention_gpu)")
    p.add_argument("--canvases", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--quantize", default="none,int8", help="expert weights of the moe kernels")
    p.add_argument("--tilings", nargs="+", default=list(GPU_TILINGS), help="GpuTilings of the moe kernels")
    p.add_argument("--blocks", nargs="+", default=list(GPU_BLOCKS), help="GpuBlocks of the attention kernel")
    p.add_argument("--context", type=int, default=1024, help="cache slots of the attention kernels")
    p.add_argument("--arch", type=int, default=90, help="compute capability (90: H100, H200)")
    args = p.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    try:
        import triton
    except ImportError:
        raise SystemExit('bench/triton_compile.py needs the triton package: pip install -e ".[triton]"') from None

    import jax

    from dgemma_jax.configs_io import load_model_config
    from pallas_kernels.common import lower_for_gpu

    config = load_model_config(args.config)
    print(f"config {os.path.relpath(args.config, ROOT)} | {config.num_experts} experts, "
          f"top-{config.num_experts_per_tok}, H {config.hidden_size}, I {config.moe_intermediate_size} | triton {triton.__version__}, sm_{args.arch} | "
          f"jax {jax.__version__}")
    print(f"{'case':<40} {'kernel':<24} {'grid':>8} {'warps':>5} {'stages':>6} {'shared KiB':>10} {'regs':>5} "
          f"{'spilled':>7}")
    sources = dict(moe=moe_cases, attention=attention_cases)
    problems = []
    for which in args.kernels.split(","):
        for case, run, shapes in sources[which](config, args):
            for kernel, warps, stages, grid, text in triton_modules(lower_for_gpu(run, *shapes)):
                row = f"{case:<40} {kernel:<24} {grid:>8} {warps:>5} {stages:>6}"
                try:
                    r = compile_for_gpu(text, warps, stages, args.arch)
                except Exception as err:  # noqa: BLE001 - report it and go on
                    problems.append(f"{' '.join(row.split())}: {type(err).__name__}: {str(err).splitlines()[0]}")
                    print(f"{row}  failed: {type(err).__name__}: {str(err).splitlines()[0]}", flush=True)
                    continue
                flags = [f for f, bad in (("shared memory", r["shared"] > SHARED_LIMIT),
                                          ("spills", r["spilled"] > 0)) if bad]
                if flags:
                    problems.append(f"{' '.join(row.split())}: {', '.join(flags)}")
                print(f"{row} {r['shared'] / 1024:>10.1f} {r['registers']:>5} {r['spilled']:>7}"
                      f"{'  <- ' + ', '.join(flags) if flags else ''}", flush=True)
    for problem in problems:
        print(f"PROBLEM: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
