"""Train-step speed: dgemma_jax's jitted train step against the same step written on transformers.

Run (from the repository root):

    PYTHONPATH=. .venv/bin/python bench/train.py [--batch 4] [--repeats 5]

Both sides run one full fine-tuning step of the diffusion objective (SPEC §5) on the random float32
checkpoint of ``bench/forward.py`` (configs/model/bench.py shape): prompt ``--prompt`` tokens, one
canvas, t ~ U(eps, 1) corruption, a no-grad self-conditioning pass, the second pass with
self-conditioning on half the rows, flat cross-entropy, backward, global-norm clip 1.0 and an
AdamW update. The AR term is off on both sides (``ar_weight 0``): transformers' forward encodes
the prompt and denoises the canvas against that cache in one call, so an AR loss over the
response would need a second encoder pass there.
  ours: ``dgemma_jax.training.trainer.make_train_step`` (jitted once; MoE back end as the trainer
        picks it: ``dense`` on CPU, ``bucketed`` on GPU, ``pallas`` on TPU; ``--moe-impl`` overrides).
  transformers: ``model(input_ids=prompt, decoder_input_ids=noisy)`` under ``no_grad`` for the
        self-conditioning logits, then ``model(..., self_conditioning_logits=..., self_conditioning_mask=...)``,
        ``loss.backward()``, ``clip_grad_norm_``, ``torch.optim.AdamW.step()`` (eager, float32).
Before timing, both compute the loss of one batch with the same noise: they must agree (``--tol``).
Reported: median step time and tokens/s (batch x (prompt + canvas) / step), and the ratio.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

from bench.forward import (OtherLoad, add_check_args, build_models, cpu_name, print_verdict, set_threads, time_pair,
                           wait_idle)
from bench.forward import parse_args as parse_shape_args


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                                epilog="Model shape flags (--hidden, --layers, --experts, --vocab, --canvas, ...) "
                                       "go to bench/forward.py's parser.")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--seed", type=int, default=0)
    add_check_args(p, target=1.0, target_help="tokens/s ratio to report against (not enforced)")
    args, rest = p.parse_known_args(argv)
    args.shape = parse_shape_args(rest)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    placement = set_threads(args.threads)
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    import jax
    import jax.numpy as jnp
    import ml_collections
    import transformers

    transformers.utils.logging.disable_progress_bar()
    from dgemma_jax.training.objective import Noise, ObjectiveConfig, losses
    from dgemma_jax.training.trainer import build_optimizer, make_train_step, training_moe_impl

    tm, ours, _, n_params = build_models(args.shape, training_moe_impl(args.moe_impl or "auto"), train=True)
    cfg = ours.config
    b, t, length, vocab = args.batch, args.prompt, cfg.canvas_length, cfg.vocab_size
    objective = ObjectiveConfig(ar_weight=0.0)
    rng = np.random.default_rng(args.seed)
    tokens = rng.integers(5, vocab, (b, t + length)).astype(np.int32)
    prompt_len = np.full((b,), t, np.int32)
    mask = np.ones((b, length), np.float32)

    # ---- parity: the same noise on both sides gives the same loss ------------------------------
    noisy = np.where(rng.random((b, length)) < 0.5, rng.integers(0, vocab, (b, length)), tokens[:, t:]).astype(np.int32)
    sc = np.arange(b) % 2 == 0
    ours_loss = float(losses(ours.module, jnp.asarray(tokens), jnp.asarray(prompt_len), jnp.asarray(mask),
                             Noise(jnp.asarray(noisy), jnp.asarray(sc)), objective)["loss"])
    prompt_t = torch.from_numpy(tokens[:, :t].astype(np.int64))
    target_t = torch.from_numpy(tokens[:, t:].astype(np.int64))

    def torch_loss(noisy_t, sc_t):
        with torch.no_grad():
            first = tm(input_ids=prompt_t, decoder_input_ids=noisy_t).logits
        logits = tm(input_ids=prompt_t, decoder_input_ids=noisy_t, self_conditioning_logits=first,
                    self_conditioning_mask=sc_t).logits
        return torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), target_t.reshape(-1))

    hf_loss = float(torch_loss(torch.from_numpy(noisy.astype(np.int64)), torch.from_numpy(sc)))
    parity_ok = abs(ours_loss - hf_loss) <= args.tol * max(1.0, abs(hf_loss))

    # ---- the two train steps -----------------------------------------------------------------------
    optim = ml_collections.ConfigDict(dict(lr=1e-4, end_lr=1e-5, warmup_steps=1, b1=0.9, b2=0.99, weight_decay=1e-4,
                                           clip_norm=1.0, grad_accum=1))
    tx, _ = build_optimizer(optim, 1000)
    import flax.nnx as nnx

    graphdef, params, rest = nnx.split(ours.module, nnx.Param, ...)
    step = jax.jit(make_train_step(graphdef, rest, tx, objective, None, 1, vocab), donate_argnums=(0, 1))
    state = {"params": params, "opt": tx.init(jax.tree.map(lambda x: x.astype(jnp.float32), params)), "i": 0}
    batch = dict(tokens=jnp.asarray(tokens), prompt_len=jnp.asarray(prompt_len), loss_mask=jnp.asarray(mask))

    def ours_step():
        state["i"] += 1
        state["params"], state["opt"], m = step(state["params"], state["opt"], None, batch,
                                                jax.random.fold_in(jax.random.key(0), state["i"]))
        jax.block_until_ready(m["loss"])

    opt = torch.optim.AdamW([p for n, p in tm.named_parameters() if "vision" not in n], lr=1e-4,
                            betas=(0.9, 0.99), weight_decay=1e-4)
    gen = torch.Generator().manual_seed(args.seed)

    def hf_step():
        tt = torch.rand((b, 1), generator=gen)
        flip = torch.rand((b, length), generator=gen) < tt
        noisy_t = torch.where(flip, torch.randint(0, vocab, (b, length), generator=gen), target_t)
        sc_t = torch.rand((b,), generator=gen) < 0.5
        opt.zero_grad(set_to_none=True)
        loss = torch_loss(noisy_t, sc_t)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tm.parameters(), 1.0)
        opt.step()

    import time

    t0 = time.perf_counter()
    ours_step()
    compile_s = time.perf_counter() - t0
    if args.wait_idle:
        wait_idle(args.wait_idle, args.max_other_load)
    with OtherLoad() as other:
        (o_med, o_min), (h_med, h_min) = time_pair(ours_step, hf_step, args.repeats, args.warmup)

    per_step = b * (t + length)
    print(f"machine: {cpu_name()} ({platform.machine()}) cores={os.cpu_count()} threads={args.threads} ({placement}) | "
          f"jax {jax.__version__} {jax.default_backend()} | torch {torch.__version__} | transformers {transformers.__version__}")
    s = args.shape
    print(f"model: hidden {s.hidden}, {s.layers} layers, {s.experts} experts top-{s.top_k}, vocab {s.vocab}, "
          f"{n_params / 1e6:.1f}M params, float32, ours moe_impl={cfg.moe_impl} | batch {b} x (prompt {t} + canvas {length}) = {per_step} tokens/step")
    print(f"parity: loss on the same noisy batch: ours {ours_loss:.6f}, transformers {hf_loss:.6f} -> "
          f"{'OK' if parity_ok else 'MISMATCH'} | first step (compile + run) {compile_s:.1f} s")
    print(f"timing: median (min) of {args.repeats} steps per side, interleaved, after {args.warmup} untimed\n")
    print(f"{'':<14}{'step ms':>10}{'(min)':>10}{'tokens/s':>12}")
    print(f"{'ours':<14}{o_med:>10.1f}{o_min:>10.1f}{per_step / o_med * 1e3:>12.1f}")
    print(f"{'transformers':<14}{h_med:>10.1f}{h_min:>10.1f}{per_step / h_med * 1e3:>12.1f}")
    ratio = h_med / o_med
    print(f"ours/transformers tokens/s: {ratio:.2f}x  (other load while timing: {other.fraction:.0%})")
    print_verdict("train tokens/s ratio", ratio, f"{ratio:.2f}x", args, other.fraction)
    return 0 if parity_ok else 1


if __name__ == "__main__":
    sys.exit(main())
