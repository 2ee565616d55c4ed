"""Canvas-pass speed: dgemma_jax against transformers' DiffusionGemmaForBlockDiffusion, on CPU.

Run (from the repository root):

    PYTHONPATH=. .venv/bin/python bench/forward.py

Options: ``--batch``, ``--repeats`` (median of N timed runs), ``--threads`` (default: the machine's
cores, used by both torch and XLA), and the model shape (``--hidden``, ``--layers``, ``--experts``, ...).

What it does:
  1. builds one random ``DiffusionGemmaConfig`` (``--layers`` layers, the last one full attention,
     every ``--full-every``-th one full, the rest sliding), instantiates
     ``DiffusionGemmaForBlockDiffusion(cfg).eval()`` in float32 and ``save_pretrained``s it to a
     temporary directory;
  2. loads that directory with ``dgemma_jax.from_pretrained(tmp, dtype="float32")`` and checks that
     both give the same canvas logits (max abs diff printed, for the full pass and for the
     canvas-only pass);
  3. times two passes for both implementations:
       - ``encode+canvas``: prompt encode then the canvas pass. Ours: the jitted
         ``model.canvas_logits(prompt, canvas)``; transformers: ``m(input_ids=prompt,
         decoder_input_ids=canvas)`` under ``torch.no_grad()``.
       - ``canvas only``: the canvas pass against an already encoded prompt. Ours: ``module.encode``
         once, then a jitted ``module.denoise(canvas, cache)``; transformers: ``m.model.encoder``
         once into a ``DynamicCache``, then ``m(decoder_input_ids=canvas, cache=cache)`` (the
         decoder reads the cache and never writes it; the script checks that).
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=128, help="prompt length T")
    p.add_argument("--canvas", type=int, default=64, help="canvas length L")
    p.add_argument("--repeats", type=int, default=20, help="timed runs per pass (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs per pass (after compilation)")
    p.add_argument("--order", choices=["interleaved", "blocks"], default="interleaved",
                   help="interleave ours/transformers runs, or time each in one block")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads = XLA threads")
    p.add_argument("--seed", type=int, default=0)
    # model shape
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--full-every", type=int, default=6, help="every N-th layer is full attention (and the last)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64, help="sliding layers")
    p.add_argument("--kv-heads", type=int, default=2, help="sliding layers")
    p.add_argument("--global-head-dim", type=int, default=128, help="full layers")
    p.add_argument("--global-kv-heads", type=int, default=1, help="full layers")
    p.add_argument("--intermediate", type=int, default=512, help="dense MLP width")
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--moe-intermediate", type=int, default=128)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--sliding-window", type=int, default=128)
    add_check_args(p, target=3.0, target_help="required canvas-only speed-up (reported, not enforced)")
    return p.parse_args(argv)


def add_check_args(p: argparse.ArgumentParser, target: float, target_help: str) -> None:
    """The flags both benchmarks share: parity tolerance, target, load checks, MoE back end."""
    p.add_argument("--tol", type=float, default=1e-3, help="max abs logit difference allowed (else exit 1)")
    p.add_argument("--target", type=float, default=target, help=target_help)
    p.add_argument("--max-other-load", type=float, default=0.10,
                   help="warn when other processes used more than this share of the cores while timing")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="before timing, wait up to this long for 3 s in a row with other load below --max-other-load")
    p.add_argument("--moe-impl", default=None, help="dgemma_jax override, e.g. 'dense' (default: the library's)")


def set_threads(n: int) -> str:
    """Limits both libraries to ``n`` threads; must run before jax and torch are imported.

    XLA's CPU client sizes its thread pool from the CPUs this process may run on (there is no XLA_FLAGS
    switch for it), so fewer threads than cores means pinning the process to ``n`` CPUs; torch gets
    ``torch.set_num_threads(n)`` in ``main``. Returns a description for the report."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    allowed = sorted(os.sched_getaffinity(0))
    if n < len(allowed):
        os.sched_setaffinity(0, allowed[:n])
        return f"pinned to CPUs {allowed[:n]}"
    return f"all {len(allowed)} CPUs"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def layer_types(n: int, every: int) -> list[str]:
    types = ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(n)]
    types[-1] = "full_attention"
    return types


def hf_config(args):
    from transformers import DiffusionGemmaConfig

    text = dict(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        global_head_dim=args.global_head_dim,
        num_global_key_value_heads=args.global_kv_heads,
        sliding_window=args.sliding_window,
        num_experts=args.experts,
        top_k_experts=args.top_k,
        moe_intermediate_size=args.moe_intermediate,
        layer_types=layer_types(args.layers, args.full_every),
    )
    vision = dict(model_type="gemma4_vision", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=2, head_dim=8)
    return DiffusionGemmaConfig(text_config=text, vision_config=vision, canvas_length=args.canvas)


def build_models(shape, moe_impl: str | None = None, train: bool = False):
    """The random float32 transformers model of ``shape`` (``eval()``, or ``train()``) and ours loaded
    from its ``save_pretrained`` (``moe_impl``: our MoE back end, None = the library default).

    Returns (transformers model, ours, seconds ``from_pretrained`` took, text parameter count)."""
    import tempfile
    import time

    import torch
    from transformers import DiffusionGemmaForBlockDiffusion

    import dgemma_jax

    tm = DiffusionGemmaForBlockDiffusion(hf_config(shape)).to(torch.float32)
    tm = tm.train() if train else tm.eval()
    n_params = sum(p.numel() for n, p in tm.named_parameters() if "vision" not in n)
    with tempfile.TemporaryDirectory(prefix="dgemma-bench-") as tmp:
        tm.save_pretrained(tmp)
        overrides = {"moe_impl": moe_impl} if moe_impl else {}
        t0 = time.perf_counter()
        ours = dgemma_jax.from_pretrained(tmp, dtype="float32", **overrides)
        load_s = time.perf_counter() - t0
    return tm, ours, load_s, n_params


class OtherLoad:
    """CPU time that OTHER processes used while the block ran, as a fraction of all cores
    (/proc/stat busy time minus this process's own CPU time). Timings are unreliable when it is high:
    with more runnable threads than cores, torch's OpenMP barriers in particular can slow down 10-100x."""

    def __enter__(self):
        self._start = self._snap()
        return self

    def __exit__(self, *exc):
        busy0, own0, wall0 = self._start
        busy1, own1, wall1 = self._snap()
        wall = max(wall1 - wall0, 1e-9)
        self.fraction = max(0.0, (busy1 - busy0) - (own1 - own0)) / (wall * (os.cpu_count() or 1))

    @staticmethod
    def _snap():
        import time

        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
            busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait
        except (OSError, ValueError):
            busy = 0.0
        t = os.times()
        return busy, t.user + t.system, time.perf_counter()


def wait_idle(max_wait_s: float, threshold: float) -> float:
    """Waits until other processes leave the cores alone for 3 s in a row (or ``max_wait_s`` passes).
    Returns the seconds waited."""
    import time

    t0 = time.perf_counter()
    quiet = 0
    while quiet < 3 and time.perf_counter() - t0 < max_wait_s:
        with OtherLoad() as other:
            time.sleep(1.0)
        quiet = quiet + 1 if other.fraction <= threshold else 0
    return time.perf_counter() - t0


def time_pair(fn_a, fn_b, repeats: int, warmup: int, order: str = "interleaved"):
    """Times ``fn_a`` and ``fn_b``; returns ((median, min) of a, (median, min) of b) in ms.

    ``interleaved``: a, b, b, a, a, b, ... so that load from other processes hits both alike.
    ``blocks``: all runs of a, then all runs of b (no hand-over between the two libraries' thread
    pools between consecutive runs)."""
    import statistics
    import time

    fns = (fn_a, fn_b)
    times = {0: [], 1: []}

    def timed(which):
        t0 = time.perf_counter()
        fns[which]()
        times[which].append((time.perf_counter() - t0) * 1e3)

    if order == "interleaved":
        for _ in range(warmup):
            fn_a()
            fn_b()
        for r in range(repeats):
            for which in ((0, 1) if r % 2 == 0 else (1, 0)):
                timed(which)
    else:
        for which in (0, 1):
            for _ in range(warmup):
                fns[which]()
            for _ in range(repeats):
                timed(which)
    return tuple((statistics.median(times[i]), min(times[i])) for i in (0, 1))


def main(argv=None) -> int:
    args = parse_args(argv)
    placement = set_threads(args.threads)

    import platform
    import time

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    import jax
    import jax.numpy as jnp
    import transformers
    from flax import nnx
    from transformers import DynamicCache

    transformers.utils.logging.disable_progress_bar()

    from dgemma_jax.cache import KVCache

    tm, ours, load_s, n_params = build_models(args, args.moe_impl)
    text_cfg = tm.config.text_config

    rng = np.random.default_rng(args.seed)
    prompt = rng.integers(0, args.vocab, (args.batch, args.prompt), dtype=np.int64)
    canvas = rng.integers(0, args.vocab, (args.batch, args.canvas), dtype=np.int64)
    prompt_t, canvas_t = torch.from_numpy(prompt), torch.from_numpy(canvas)


    # ---- ours -----------------------------------------------------------------------------------
    prompt_j, canvas_j = jnp.asarray(prompt, jnp.int32), jnp.asarray(canvas, jnp.int32)
    t0 = time.perf_counter()
    ours_full = jax.block_until_ready(ours.canvas_logits(prompt, canvas))
    compile_full_s = time.perf_counter() - t0

    graphdef = ours.graphdef

    @jax.jit
    def encode(state, tokens):
        module = nnx.merge(graphdef, state)
        cache = KVCache.for_positions(module.config, tokens.shape[0], tokens.shape[1], module.dtype)
        return module.encode(tokens, cache)[1]

    @jax.jit
    def denoise(state, tokens, cache):
        return nnx.merge(graphdef, state).denoise(tokens, cache)

    cache_j = jax.block_until_ready(encode(ours.state, prompt_j))
    t0 = time.perf_counter()
    ours_canvas = jax.block_until_ready(denoise(ours.state, canvas_j, cache_j))
    compile_canvas_s = time.perf_counter() - t0

    # ---- transformers ---------------------------------------------------------------------------
    with torch.no_grad():
        hf_full = tm(input_ids=prompt_t, decoder_input_ids=canvas_t).logits
        cache_t = DynamicCache(config=text_cfg)
        tm.model.encoder(input_ids=prompt_t, cache=cache_t)
        cached_len = cache_t.get_seq_length()
        hf_canvas = tm(decoder_input_ids=canvas_t, cache=cache_t).logits
        if cache_t.get_seq_length() != cached_len:
            raise RuntimeError("the transformers decoder wrote to the cache; the canvas-only timing is invalid")

    diff_full = float(np.max(np.abs(np.asarray(ours_full) - hf_full.numpy())))
    diff_canvas = float(np.max(np.abs(np.asarray(ours_canvas) - hf_canvas.numpy())))
    diff_self = float(np.max(np.abs(np.asarray(ours_canvas) - np.asarray(ours_full))))
    scale = float(np.max(np.abs(hf_full.numpy())))

    # ---- timing ---------------------------------------------------------------------------------
    def ours_full_fn():
        jax.block_until_ready(ours.canvas_logits(prompt, canvas))

    def ours_canvas_fn():
        jax.block_until_ready(denoise(ours.state, canvas_j, cache_j))

    def hf_full_fn():
        with torch.no_grad():
            tm(input_ids=prompt_t, decoder_input_ids=canvas_t)

    def hf_canvas_fn():
        with torch.no_grad():
            tm(decoder_input_ids=canvas_t, cache=cache_t)

    waited = wait_idle(args.wait_idle, args.max_other_load) if args.wait_idle > 0 else 0.0
    rows = []
    for name, ours_fn, hf_fn in (("encode+canvas", ours_full_fn, hf_full_fn), ("canvas only", ours_canvas_fn, hf_canvas_fn)):
        with OtherLoad() as other:
            (o_med, o_min), (h_med, h_min) = time_pair(ours_fn, hf_fn, args.repeats, args.warmup, args.order)
        rows.append((name, o_med, o_min, h_med, h_min, other.fraction))
    if cache_t.get_seq_length() != cached_len:
        raise RuntimeError("the transformers cache changed during timing")

    # ---- report ---------------------------------------------------------------------------------
    lt = text_cfg.layer_types
    print(f"machine: {cpu_name()} ({platform.machine()}) cores={os.cpu_count()} threads={args.threads} ({placement}) | "
          f"python {platform.python_version()} jax {jax.__version__} ({jax.default_backend()}) "
          f"flax {__import__('flax').__version__} torch {torch.__version__} transformers {transformers.__version__} "
          f"| torch attn={tm.config._attn_implementation}")
    print(f"model: hidden {args.hidden}, {len(lt)} layers ({lt.count('sliding_attention')} sliding + "
          f"{lt.count('full_attention')} full), heads {args.heads}, sliding hd {args.head_dim}/kv {args.kv_heads}, "
          f"full hd {args.global_head_dim}/kv {args.global_kv_heads}, mlp {args.intermediate}, "
          f"{args.experts} experts top-{args.top_k} x {args.moe_intermediate}, vocab {args.vocab}, "
          f"window {args.sliding_window}; {n_params / 1e6:.2f}M text params, float32")
    print(f"shapes: batch {args.batch}, prompt {args.prompt}, canvas {args.canvas}; "
          f"moe_impl={ours.config.moe_impl}; median (and min) of {args.repeats} runs, order {args.order}, "
          f"after {args.warmup} warm-up runs" + (f"; waited {waited:.0f}s for an idle machine" if waited else ""))
    print(f"load: from_pretrained {load_s:.2f}s; compile+first run: canvas_logits {compile_full_s:.2f}s, "
          f"denoise {compile_canvas_s:.2f}s")
    parity_ok = max(diff_full, diff_canvas) <= args.tol
    print(f"parity: max|ours - transformers| encode+canvas {diff_full:.3e}, canvas only {diff_canvas:.3e} "
          f"(max|logit| {scale:.2f}); ours canvas-only vs encode+canvas {diff_self:.3e} -> "
          f"{'OK' if parity_ok else 'FAIL'} (tol {args.tol:g})")
    print()
    header = (f"{'pass':<15} {'ours ms':>10} {'(min)':>8} {'transformers ms':>16} {'(min)':>8} {'ratio tf/ours':>14} "
              f"{'other load':>11}")
    print(header)
    print("-" * len(header))
    for name, o_med, o_min, h_med, h_min, other in rows:
        print(f"{name:<15} {o_med:>10.2f} {o_min:>8.2f} {h_med:>16.2f} {h_min:>8.2f} {h_med / o_med:>13.2f}x "
              f"{other:>10.0%}")
    busy = max(r[5] for r in rows)
    print(f"(other load: CPU time used by other processes during that pass, as a share of all {os.cpu_count()} cores)")
    canvas_ratio = rows[1][3] / rows[1][1]
    print_verdict("canvas-only ratio", canvas_ratio, f"{canvas_ratio:.2f}x", args, busy)
    return 0 if parity_ok else 1


def print_verdict(what: str, ratio: float, detail: str, args, busy: float) -> None:
    """The target line (and a warning when other processes loaded the machine while timing)."""
    unreliable = busy > args.max_other_load
    if unreliable:
        print(f"WARNING: other processes used up to {busy:.0%} of the machine while timing: these numbers are "
              f"not trustworthy; rerun on an idle machine.")
    print(f"\ntarget: {what} >= {args.target:g}x (medians): {'MET' if ratio >= args.target else 'NOT MET'} "
          f"({detail}){' [UNRELIABLE: machine was busy]' if unreliable else ''}")


if __name__ == "__main__":
    sys.exit(main())
