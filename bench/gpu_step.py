"""Denoise-step latency of the full-size model on one accelerator: ours vs transformers on the same
card in the same run, and vs the weight-read floor.

Run on the GPU machine (from the repository root):

    python bench/gpu_step.py                      # 26B-A4B config, random bf16 weights
    python bench/gpu_step.py --config configs/model/bench.py --dtype float32   # a CPU smoke run

Options: ``--batch`` (default 1 4), ``--context`` (cached prompt tokens, default 1024), ``--steps``
(denoising passes per canvas, default 16), ``--repeats`` (median of N, default 10), ``--sides``
(default ours,ours-int8,transformers; ``ours-int8`` is ours with int8 experts, ``dgemma_jax.quant``),
``--moe-impl`` (ours' MoE back end, default auto), ``--attention-impl`` (ours' attention back end,
default xla; ``pallas_gpu`` is the GPU kernel).

Each side runs in its own subprocess: the 26B model in bf16 is ~52 GB, one copy at a time fits an
80 GB card. Per side and batch size B, on random weights drawn on the device:
  * ``step``: one canvas pass (decoder over the canvas with the self-conditioning logits of the
    previous step, against a cache of ``--context`` tokens), median wall time;
  * ``canvas``: one canvas's whole denoising loop of ``--steps`` passes (adaptive stopping off) and
    its commit; canvas-to-canvas tokens/s = B * canvas length / that time. Ours: the jitted loop
    ``generate`` runs; transformers: ``generate`` of two canvases minus ``generate`` of one.
  * the floor: bytes of all weights (at B = 1 a 256-token canvas routes to nearly every expert) /
    the device's copy bandwidth measured here (a 2 GiB device-to-device copy, read + write).
The table prints ours/transformers and each side's step over its own floor (int8 experts halve the
bytes). Targets (issue 6): <= 1.25x the floor in bf16; with 8-bit weights >= 1,800 canvas-to-canvas
tokens/s at 16 passes per canvas.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "model", "diffusiongemma_26b_a4b.py")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--sides", default="ours,ours-int8,transformers")
    p.add_argument("--moe-impl", default="auto")
    p.add_argument("--attention-impl", default="xla")
    p.add_argument("--side", default=None, help=argparse.SUPPRESS)  # internal: run one side, print JSON
    return p.parse_args(argv)


def progress(message: str) -> None:
    print(f"[gpu_step {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def median_seconds(fn, repeats: int, sync) -> float:
    fn()
    sync()  # warm-up (compiles)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 2 GiB (CPU: 256 MiB) device-to-device elementwise copy."""
    import jax
    import jax.numpy as jnp

    buf = jnp.zeros((1 << (29 if jax.default_backend() != "cpu" else 26),), jnp.float32)
    copy = jax.jit(lambda x: x + 1)
    return 2 * buf.nbytes / median_seconds(lambda: copy(buf).block_until_ready(), 5, lambda: None)


def random_model(config, dtype, quantize: str = "none"):
    """(graphdef, state) of ``DiffusionGemma(config)`` with N(0, 0.02) weights in ``dtype`` drawn on the
    device (never whole on the host), experts then quantised per ``quantize`` (``dgemma_jax.quant``)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dgemma_jax.model import DiffusionGemma
    from dgemma_jax.quant import quantize as quantize_module

    module = nnx.eval_shape(lambda: DiffusionGemma(config, rngs=nnx.Rngs(0), dtype=dtype))
    key = jax.random.key(0)
    draw = jax.jit(lambda k, shape: (0.02 * jax.random.normal(k, shape, jnp.float32)).astype(dtype), static_argnums=1)
    for i, (_, var) in enumerate(v for v in nnx.iter_graph(module) if isinstance(v[1], nnx.Variable)):
        var.set_value(draw(jax.random.fold_in(key, i), var.shape))
    return nnx.split(quantize_module(module, quantize))


def denoise_pass(graphdef, state, config, dtype, batch: int, context: int, rng):
    """One canvas pass of ``batch`` random canvases, with the self-conditioning logits of a first
    pass, over a cache of ``context`` random prompt tokens (room for two canvases more).
    -> (step: runs the pass once and waits for it, the cache)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dgemma_jax.cache import KVCache

    encode = jax.jit(lambda state, tokens: nnx.merge(graphdef, state).encode(
        tokens, KVCache.for_positions(config, tokens.shape[0], tokens.shape[1] + 2 * config.canvas_length, dtype))[1])
    denoise = jax.jit(lambda state, canvas, cache, sc: nnx.merge(graphdef, state).denoise(
        canvas, cache, sc, jnp.ones((canvas.shape[0],), bool)))
    prompt = jnp.asarray(rng.integers(0, config.vocab_size, (batch, context)), jnp.int32)
    canvas = jnp.asarray(rng.integers(0, config.vocab_size, (batch, config.canvas_length)), jnp.int32)
    cache = jax.block_until_ready(encode(state, prompt))
    sc = denoise(state, canvas, cache, None).astype(dtype)
    return lambda: denoise(state, canvas, cache, sc).block_until_ready(), cache


def run_ours(args, quantize: str = "none") -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dgemma_jax.configs_io import load_model_config
    from dgemma_jax.generation import CanvasRows, _denoise_and_commit, eos_rows
    from dgemma_jax.sampling import SamplerConfig

    config = load_model_config(args.config).replace(moe_impl=args.moe_impl, attention_impl=args.attention_impl)
    dtype = jnp.dtype(args.dtype)
    graphdef, state = random_model(config, dtype, quantize)
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(state))

    bandwidth = copy_bandwidth()
    progress(f"ours ({quantize}): {weight_bytes / 1e9:.2f} GB of random weights on {jax.devices()[0].device_kind}; "
             f"copy bandwidth {bandwidth / 1e9:.0f} GB/s")

    sampler = SamplerConfig(max_denoising_steps=args.steps, confidence_threshold=0.0)
    rng = np.random.default_rng(0)
    rows = {}
    for b in args.batch:
        step, cache = denoise_pass(graphdef, state, config, dtype, b, args.context, rng)
        step_s = median_seconds(step, args.repeats, lambda: None)
        progress(f"ours ({quantize}) batch {b}: step {step_s * 1e3:.2f} ms")
        row_keys = jax.random.split(jax.random.key(1), b)
        free = jnp.full((b, config.canvas_length), -1, jnp.int32)

        held, start = [cache], jnp.copy(cache.length)  # the loop donates the cache and commits; reset the length

        def loop():
            rows = CanvasRows(row_keys, jnp.zeros((b,), jnp.int32), jnp.zeros((b,), bool), free, jnp.ones((b,), bool),
                              eos_rows([], b), sampler.params(b))
            _, passes, done = _denoise_and_commit(graphdef, state, held[0], rows, jnp.int32(0), filters=sampler.filters)
            held[0] = dataclasses.replace(done, length=jnp.copy(start))
            if int(passes[0]) != args.steps:
                raise RuntimeError(f"ours ran {int(passes[0])} passes, expected {args.steps}")

        canvas_s = median_seconds(loop, max(3, args.repeats // 3), lambda: None)
        rows[b] = dict(step_s=step_s, canvas_s=canvas_s)
        progress(f"ours ({quantize}) batch {b}: canvas {canvas_s * 1e3:.1f} ms")
    return dict(device=jax.devices()[0].device_kind, weight_bytes=weight_bytes, bandwidth=bandwidth, rows=rows)


def run_transformers(args) -> dict:
    import numpy as np
    import torch
    from transformers import (DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion,
                              DiffusionGemmaGenerationConfig, DynamicCache)

    from dgemma_jax.configs_io import load_model_config

    config = load_model_config(args.config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    hf = DiffusionGemmaConfig(**config.to_hf_dict())
    torch.manual_seed(0)
    tm = _materialize(DiffusionGemmaForBlockDiffusion, hf, dtype, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    weight_bytes = sum(p.numel() * p.element_size() for n, p in tm.named_parameters() if "vision" not in n)
    rng = np.random.default_rng(0)
    length = hf.canvas_length
    rows = {}
    for b in args.batch:
        prompt = torch.from_numpy(rng.integers(0, config.vocab_size, (b, args.context))).to(device)
        canvas = torch.from_numpy(rng.integers(0, config.vocab_size, (b, length))).to(device)
        with torch.no_grad():
            cache = DynamicCache(config=hf.text_config)
            tm.model.encoder(input_ids=prompt, cache=cache)
            cached = cache.get_seq_length()
            sc = tm(decoder_input_ids=canvas, cache=cache).logits
            step_s = median_seconds(lambda: tm(decoder_input_ids=canvas, cache=cache, self_conditioning_logits=sc),
                                    args.repeats, sync)
            if cache.get_seq_length() != cached:
                raise RuntimeError("the transformers decoder wrote to the cache; the step timing is invalid")
            progress(f"transformers batch {b}: step {step_s * 1e3:.2f} ms")
            # stability_threshold = steps keeps adaptive stopping off (see bench/generate.py)
            gen = DiffusionGemmaGenerationConfig(max_denoising_steps=args.steps, stability_threshold=args.steps,
                                                 eos_token_id=None, pad_token_id=0, t_min=0.4, t_max=0.8)
            def generate(n):
                out = tm.generate(prompt, max_new_tokens=n * length, generation_config=gen)
                passes = n * length / out.tokens_per_forward.float()  # decoder passes per row
                if out.sequences.shape[1] != args.context + n * length or not torch.all(passes == n * args.steps):
                    raise RuntimeError(f"transformers ran {passes.tolist()} passes for {n} canvases, "
                                       f"expected {n * args.steps}")

            one, two = (median_seconds(lambda n=n: generate(n), max(3, args.repeats // 3), sync) for n in (1, 2))
        rows[b] = dict(step_s=step_s, canvas_s=two - one)  # the second canvas: its loop and its commit
        progress(f"transformers batch {b}: canvas {(two - one) * 1e3:.1f} ms")
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return dict(device=name, weight_bytes=weight_bytes, rows=rows)


def _materialize(cls, hf_config, dtype, device: str):
    """``cls`` with random weights on ``device``, each tied tensor allocated once.

    A plain build on the device allocates the encoder's and the decoder's copies of every shared
    weight before ``tie_weights`` drops one (2 x 50 GB for the 26B model, more than an 80 GB card
    holds). So the model is built with its parameters on the meta device (buffers keep their
    constructed values), then one tensor per distinct parameter is allocated on ``device`` and
    filled by the model's own initialisation."""
    import torch

    register = torch.nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None and not param.is_meta:  # a meta one is being tied: keep it, shared
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=False)

    torch.nn.Module.register_parameter = register_on_meta
    try:
        model = cls._from_config(hf_config, dtype=dtype)  # ties the encoder's weights to the decoder's
    finally:
        torch.nn.Module.register_parameter = register
    made = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                if id(p) not in made:
                    made[id(p)] = torch.nn.Parameter(torch.empty_like(p, device=device), requires_grad=False)
                module._parameters[name] = made[id(p)]
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = b.to(device)
        module._is_hf_initialized = False
    model.initialize_weights()
    return model.eval()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.side:
        if args.side == "transformers":
            result = run_transformers(args)
        else:
            result = run_ours(args, quantize="int8" if args.side == "ours-int8" else "none")
        print("RESULT " + json.dumps(result))
        return 0
    results = {}
    for side in args.sides.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "--side", side, *(argv if argv is not None else sys.argv[1:])]
        start = time.perf_counter()
        path = os.pathsep.join(filter(None, (ROOT, os.environ.get("PYTHONPATH"))))
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True,  # stderr (progress) passes through
                              env=dict(os.environ, PYTHONPATH=path, XLA_PYTHON_CLIENT_MEM_FRACTION=".92"))
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(proc.stdout[-3000:], file=sys.stderr)
            raise SystemExit(f"{side}: failed (exit {proc.returncode})")
        results[side] = json.loads(lines[-1][len("RESULT "):])
        progress(f"{side}: done in {time.perf_counter() - start:.0f} s: {lines[-1][len('RESULT '):]}")
    ours = results.get("ours")
    print(f"config {os.path.relpath(args.config, ROOT)} | {args.dtype} | context {args.context} | "
          f"{args.steps} passes per canvas | device {next(iter(results.values()))['device']}")
    for side, r in results.items():
        if "bandwidth" in r:
            print(f"{side}: weights {r['weight_bytes'] / 1e9:.2f} GB | copy bandwidth {r['bandwidth'] / 1e9:.0f} GB/s | "
                  f"weight-read floor {r['weight_bytes'] / r['bandwidth'] * 1e3:.2f} ms per pass")
    print(f"{'side':<14}{'batch':>6}{'step ms':>10}{'x floor':>9}{'canvas ms':>11}{'tok/s':>9}")
    for side, r in results.items():
        floor = r["weight_bytes"] / r["bandwidth"] if "bandwidth" in r else None
        for b, row in r["rows"].items():
            tok_s = int(b) * _canvas_length(args.config) / row["canvas_s"]
            ratio = f"{row['step_s'] / floor:.2f}" if floor else "-"
            print(f"{side:<14}{b:>6}{row['step_s'] * 1e3:>10.2f}{ratio:>9}{row['canvas_s'] * 1e3:>11.1f}{tok_s:>9.0f}")
    if ours and "transformers" in results:
        for b in ours["rows"]:
            o, t = ours["rows"][b], results["transformers"]["rows"][b]
            print(f"batch {b}: ours/transformers step {o['step_s'] / t['step_s']:.2f}x, "
                  f"canvas {o['canvas_s'] / t['canvas_s']:.2f}x (lower is faster)")
    return 0


def _canvas_length(config_path: str) -> int:
    from dgemma_jax.configs_io import load_model_config

    return load_model_config(config_path).canvas_length


if __name__ == "__main__":
    sys.exit(main())
