"""Generation speed: ``dgemma_jax.generate`` against transformers' ``DiffusionGemmaForBlockDiffusion.generate``, on CPU.

Run (from the repository root):

    PYTHONPATH=. .venv/bin/python bench/generate.py

Options: ``--batch`` (one or more batch sizes, default 1 4), ``--prompt`` (prompt length, default
128), ``--new-tokens`` (default 256), ``--steps`` (denoising steps per canvas, default 16),
``--repeats`` (median of N timed runs per side, default 3), ``--threads`` (default: the machine's
cores, used by both torch and XLA). The model shape flags (``--hidden``, ``--layers``,
``--experts``, ``--vocab``, ``--canvas``, ...) are those of ``bench/forward.py``, whose defaults are
``configs/model/bench.py`` (vocab 4096, hidden 256, 6 layers 5 sliding : 1 full, 16 experts top-4,
canvas 64); the script says whether the loaded model matches that file.

What it does:
  1. builds the random float32 checkpoint of ``bench/forward.py`` (same code, imported), saves it
     to a temporary directory, loads it with ``dgemma_jax.from_pretrained(tmp, dtype="float32")`` and
     checks that both give the same canvas logits;
  2. for each batch size, on one random prompt [B, T]:
       - ours: ``dgemma_jax.generate(model, prompt, max_new_tokens, max_denoising_steps=steps,
         t_min=0.4, t_max=0.8, entropy_bound=0.1, confidence_threshold=0.0, eos_token_ids=[])``
         (no token ends a row);
         ``confidence_threshold=0`` disables adaptive stopping (the mean entropy is never < 0);
       - transformers: ``tm.generate(prompt, generation_config=DiffusionGemmaGenerationConfig(...))``
         with the same sampler settings, ``eos_token_id=None`` (no EOS criterion), ``pad_token_id=0``
         and the default (dynamic, eager) cache. Its adaptive stopping cannot be switched off with
         ``confidence_threshold=0`` (validation wants > 0) nor ``None`` (the default 0.005 fills it
         in), so ``stability_threshold=steps`` is used: the argmax canvas would have to equal each
         of the previous ``steps`` ones, and only ``steps - 1`` exist before the last step;
       - one untimed call of each (ours: this one compiles; its time is reported) that also checks
         that every row ran exactly ``new_tokens / canvas`` canvases of ``steps`` decoder passes:
         ours ``result.steps == steps`` with shape [B, canvases]; transformers: a forward hook counts
         the decoder calls (canvases * steps) and the encoder calls (canvases: prefill + one commit
         per canvas but the last, as ours), and ``tokens_per_forward`` gives the passes per row;
       - ``--repeats`` timed calls of each, interleaved (ours, tf, tf, ours, ...), medians reported;
         every timed call is checked again (sequence shape, steps, tokens_per_forward).
  3. prints tokens/s = B * new_tokens / wall seconds of the whole generate call, the ratio
     ours/transformers, ours' prefill time and mean per-canvas latency (from the result's
     ``prefill_seconds`` and ``canvas_seconds``) and transformers' per-canvas latency (its wall time
     / canvases, prefill included).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

from bench.forward import (OtherLoad, add_check_args, build_models, cpu_name, print_verdict, set_threads, time_pair,
                           wait_idle)
from bench.forward import parse_args as parse_shape_args

REPO = Path(__file__).resolve().parent.parent
BENCH_CONFIG = REPO / "configs" / "model" / "bench.py"
T_MIN, T_MAX, ENTROPY_BOUND = 0.4, 0.8, 0.1
# Architecture fields compared with configs/model/bench.py (special token ids and back ends are not).
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_heads", "head_dim", "num_kv_heads",
                "global_head_dim", "num_global_kv_heads", "layer_types", "sliding_window", "rope", "num_experts",
                "num_experts_per_tok", "moe_intermediate_size", "rms_norm_eps", "final_logit_softcap",
                "hidden_activation", "canvas_length")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], allow_abbrev=False,
        epilog="Model shape flags (--hidden, --layers, --full-every, --heads, --experts, --top-k, --vocab, --canvas, "
               "...) are passed on to bench/forward.py's parser; its defaults are configs/model/bench.py.")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="batch sizes")
    p.add_argument("--prompt", type=int, default=128, help="prompt length T")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens generated per row")
    p.add_argument("--steps", type=int, default=16, help="denoising steps per canvas (all of them are run)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per side and batch size (median reported)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads = XLA threads")
    p.add_argument("--seed", type=int, default=0)
    add_check_args(p, target=5.0, target_help="required tokens/s ratio (reported, not enforced)")
    args, rest = p.parse_known_args(argv)
    args.shape = parse_shape_args(rest)
    if args.new_tokens < 1 or args.steps < 1 or args.repeats < 1 or min(args.batch) < 1:
        p.error("--batch, --new-tokens, --steps and --repeats must be >= 1")
    return args


def bench_config_diff(config) -> list[str]:
    """Fields of the loaded model's config that differ from configs/model/bench.py."""
    from dgemma_jax.configs_io import load_model_config

    ref = load_model_config(BENCH_CONFIG)

    def value(cfg, field):
        v = getattr(cfg, field)
        return dict(v) if field == "rope" else v  # (layer type, RopeConfig) pairs: order does not matter

    return [f"{f}: {value(config, f)!r} (bench.py: {value(ref, f)!r})"
            for f in SHAPE_FIELDS if value(config, f) != value(ref, f)]


class CallCounter:
    """Counts the calls of a torch module (a forward hook) while active."""

    def __init__(self, module):
        self.module, self.calls = module, 0

    def __enter__(self):
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def _hook(self, *unused):
        self.calls += 1

    def __exit__(self, *exc):
        self._handle.remove()


def main(argv=None) -> int:
    args = parse_args(argv)
    shape = args.shape
    placement = set_threads(args.threads)

    import platform
    import time

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    import jax
    import transformers
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
        DiffusionGemmaGenerationConfig,
        EntropyBoundSamplerConfig,
    )

    transformers.utils.logging.disable_progress_bar()

    import dgemma_jax

    new_tokens, steps = args.new_tokens, args.steps
    tm, ours, load_s, n_params = build_models(shape, args.moe_impl)
    text_cfg = tm.config.text_config

    canvas_len, vocab = ours.config.canvas_length, ours.config.vocab_size
    if (canvas_len, vocab) != (tm.config.canvas_length, text_cfg.vocab_size):
        raise RuntimeError(f"canvas/vocab differ: ours {canvas_len}/{vocab}, transformers "
                           f"{tm.config.canvas_length}/{text_cfg.vocab_size}")
    n_canvases = -(-new_tokens // canvas_len)
    if new_tokens % canvas_len:
        print(f"note: --new-tokens {new_tokens} is not a multiple of the canvas ({canvas_len}); both sides run "
              f"{n_canvases} whole canvases and keep {new_tokens} tokens")
    diffs = bench_config_diff(ours.config)

    # ---- parity of the two models (one canvas pass) ---------------------------------------------
    rng = np.random.default_rng(args.seed)
    p_check = rng.integers(0, vocab, (1, args.prompt), dtype=np.int64)
    c_check = rng.integers(0, vocab, (1, canvas_len), dtype=np.int64)
    ours_logits = np.asarray(ours.canvas_logits(p_check, c_check))
    with torch.no_grad():
        hf_logits = tm(input_ids=torch.from_numpy(p_check), decoder_input_ids=torch.from_numpy(c_check)).logits.numpy()
    diff = float(np.max(np.abs(ours_logits - hf_logits)))
    parity_ok = diff <= args.tol

    # ---- the two generate calls, and their checks -----------------------------------------------
    ours_kwargs = dict(max_new_tokens=new_tokens, seed=args.seed, max_denoising_steps=steps, t_min=T_MIN,
                       t_max=T_MAX, entropy_bound=ENTROPY_BOUND, confidence_threshold=0.0, stability_threshold=1,
                       eos_token_ids=[])  # no token ends a row: every row runs every canvas
    hf_gen_config = DiffusionGemmaGenerationConfig(
        max_new_tokens=new_tokens, max_denoising_steps=steps, t_min=T_MIN, t_max=T_MAX,
        sampler_config=EntropyBoundSamplerConfig(entropy_bound=ENTROPY_BOUND),
        stability_threshold=steps, confidence_threshold=0.005, eos_token_id=None, pad_token_id=0)

    def check_ours(result, batch, prompt_len):
        if result.sequences.shape != (batch, prompt_len + new_tokens):
            raise RuntimeError(f"ours: sequences {result.sequences.shape}, expected {(batch, prompt_len + new_tokens)}")
        if result.steps.shape != (batch, n_canvases) or not (result.steps == steps).all():
            raise RuntimeError(f"ours: expected {steps} steps in each of {n_canvases} canvases per row, got "
                               f"{result.steps.tolist()}")

    def check_hf(out, batch, prompt_len):
        seq = out.sequences
        if tuple(seq.shape) != (batch, prompt_len + n_canvases * canvas_len):
            raise RuntimeError(f"transformers: sequences {tuple(seq.shape)}, expected "
                               f"{(batch, prompt_len + n_canvases * canvas_len)}")
        # tokens_per_forward = non-pad (!= 0) generated tokens / decoder passes of the row
        valid = (seq[:, prompt_len:] != 0).sum(-1).double()
        passes = valid / out.tokens_per_forward.double()
        if not torch.allclose(passes, torch.full_like(passes, n_canvases * steps)):
            raise RuntimeError(f"transformers: decoder passes per row {passes.tolist()}, expected "
                               f"{n_canvases * steps}")

    rows, first_calls = [], []
    waited = wait_idle(args.wait_idle, args.max_other_load) if args.wait_idle > 0 else 0.0
    for batch in args.batch:
        prompt = rng.integers(0, vocab, (batch, args.prompt), dtype=np.int64)
        prompt_t = torch.from_numpy(prompt)

        t0 = time.perf_counter()
        check_ours(dgemma_jax.generate(ours, prompt, **ours_kwargs), batch, args.prompt)
        ours_first_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        with CallCounter(tm.model.decoder) as dec, CallCounter(tm.model.encoder) as enc:
            out = tm.generate(prompt_t, generation_config=hf_gen_config)
        hf_first_s = time.perf_counter() - t0
        check_hf(out, batch, args.prompt)
        if (dec.calls, enc.calls) != (n_canvases * steps, n_canvases):
            raise RuntimeError(f"transformers ran {dec.calls} decoder and {enc.calls} encoder calls, expected "
                               f"{n_canvases * steps} and {n_canvases}")
        first_calls.append((batch, ours_first_s, hf_first_s))

        ours_results, hf_results = [], []
        with OtherLoad() as other:
            (o_med, o_min), (h_med, h_min) = time_pair(
                lambda: ours_results.append(dgemma_jax.generate(ours, prompt, **ours_kwargs)),
                lambda: hf_results.append(tm.generate(prompt_t, generation_config=hf_gen_config)),
                args.repeats, 0, "interleaved")
        for r in ours_results:
            check_ours(r, batch, args.prompt)
        for r in hf_results:
            check_hf(r, batch, args.prompt)
        prefill_ms = statistics.median(r.prefill_seconds for r in ours_results) * 1e3
        canvas_ms = statistics.median(statistics.mean(r.canvas_seconds) for r in ours_results) * 1e3
        rows.append(dict(batch=batch, o_med=o_med, o_min=o_min, h_med=h_med, h_min=h_min, prefill_ms=prefill_ms,
                         canvas_ms=canvas_ms, other=other.fraction))

    # ---- report ---------------------------------------------------------------------------------
    lt = text_cfg.layer_types
    print(f"machine: {cpu_name()} ({platform.machine()}) cores={os.cpu_count()} threads={args.threads} ({placement}) | "
          f"python {platform.python_version()} jax {jax.__version__} ({jax.default_backend()}) "
          f"flax {__import__('flax').__version__} torch {torch.__version__} transformers {transformers.__version__} "
          f"| torch threads={torch.get_num_threads()} attn={tm.config._attn_implementation}")
    print(f"model: hidden {shape.hidden}, {len(lt)} layers ({lt.count('sliding_attention')} sliding + "
          f"{lt.count('full_attention')} full), heads {shape.heads}, sliding hd {shape.head_dim}/kv {shape.kv_heads}, "
          f"full hd {shape.global_head_dim}/kv {shape.global_kv_heads}, mlp {shape.intermediate}, "
          f"{shape.experts} experts top-{shape.top_k} x {shape.moe_intermediate}, vocab {vocab}, "
          f"window {shape.sliding_window}, canvas {canvas_len}; {n_params / 1e6:.2f}M text params, float32; "
          + ("matches configs/model/bench.py" if not diffs
             else "DIFFERS from configs/model/bench.py: " + "; ".join(diffs)))
    print(f"generation: prompt {args.prompt}, {new_tokens} new tokens = {n_canvases} canvases x {steps} "
          f"denoising steps (all run: adaptive stopping off, no EOS), t {T_MAX}->{T_MIN}, "
          f"entropy bound {ENTROPY_BOUND}; moe_impl={ours.config.moe_impl}; transformers cache: dynamic (eager)")
    print(f"timing: median (and min) of {args.repeats} runs per side, interleaved, after one untimed run each"
          + (f"; waited {waited:.0f}s for an idle machine" if waited else ""))
    print(f"load: from_pretrained {load_s:.2f}s; first generate call (ours: compile + run; transformers: run): "
          + ", ".join(f"batch {b}: ours {o:.2f}s, transformers {h:.2f}s" for b, o, h in first_calls))
    print(f"parity: max|ours - transformers| canvas logits {diff:.3e} (max|logit| {np.max(np.abs(hf_logits)):.2f}) -> "
          f"{'OK' if parity_ok else 'FAIL'} (tol {args.tol:g}); every run checked: {n_canvases} canvases x {steps} "
          f"steps per row on both sides")
    print()
    header = (f"{'batch':>5} {'ours tok/s':>11} {'tf tok/s':>9} {'ours/tf':>8} | {'ours s':>7} {'(min)':>7} "
              f"{'prefill ms':>10} {'canvas ms':>9} | {'tf s':>7} {'(min)':>7} {'canvas ms':>9} | {'other load':>10}")
    print(header)
    print("-" * len(header))
    for r in rows:
        b = r["batch"]
        ours_tps = b * new_tokens / (r["o_med"] / 1e3)
        hf_tps = b * new_tokens / (r["h_med"] / 1e3)
        print(f"{b:>5} {ours_tps:>11.1f} {hf_tps:>9.1f} {ours_tps / hf_tps:>7.2f}x | {r['o_med'] / 1e3:>7.3f} "
              f"{r['o_min'] / 1e3:>7.3f} {r['prefill_ms']:>10.2f} {r['canvas_ms']:>9.2f} | {r['h_med'] / 1e3:>7.3f} "
              f"{r['h_min'] / 1e3:>7.3f} {r['h_med'] / n_canvases:>9.2f} | {r['other']:>9.0%}")
    print(f"(tok/s = batch x {new_tokens} / median wall time of the whole generate call; ours canvas ms = mean of "
          f"result.canvas_seconds (denoise + commit), prefill separate; tf canvas ms = wall time / {n_canvases}, "
          f"prefill included; other load: CPU time used by other processes while timing that batch, as a share of "
          f"all {os.cpu_count()} cores)")
    busy = max(r["other"] for r in rows)
    worst = min(r["h_med"] / r["o_med"] for r in rows)
    print_verdict("ours/transformers tokens/s at every batch size", worst, f"lowest {worst:.2f}x", args, busy)
    return 0 if parity_ok else 1


if __name__ == "__main__":
    sys.exit(main())
