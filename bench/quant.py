"""int8 expert weights against bf16: logits error and, for a Sudoku model, solve rates.

Run (from the repository root):

    PYTHONPATH=. .venv/bin/python bench/quant.py [--model DIR] [--batch 8] [--puzzles 100]

``--model`` defaults to the embedded default (Sudoku) model, a trained checkpoint, so the error is
that of real weight distributions rather than random ones. Both models are loaded in bfloat16 from
the same checkpoint; one has its experts quantised (``quantize="int8"``: symmetric int8, a float32
scale per output channel). On random prompts and canvases it prints the canvas-logit error
(max and mean |int8 - bf16|, both over the bf16 logits' standard deviation), how often the top
token agrees and the mean KL(bf16 || int8), next to the same numbers for bf16 against float32
(the error bf16 itself brings); the MoE layers' bytes of both; and, with ``--puzzles``,
both models' Sudoku scores on fresh puzzles (generator seed 20261124, givens clamped).
"""

from __future__ import annotations

import argparse
import json


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=96)
    p.add_argument("--puzzles", type=int, default=100, help="Sudoku puzzles to solve with both (0: skip)")
    p.add_argument("--seed", type=int, default=20261124)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import jax
    import numpy as np
    from flax import nnx

    import dgemma_jax
    from dgemma_jax import sudoku
    from dgemma_jax.default_model import default_model_dir
    from dgemma_jax.tokenizer import Tokenizer

    path = args.model or default_model_dir()
    models = {mode: dgemma_jax.from_pretrained(path, dtype="bfloat16", quantize=mode) for mode in ("none", "int8")}
    config = models["none"].config
    expert_bytes = {mode: sum(x.nbytes for layer in m.module.layers for x in jax.tree.leaves(nnx.state(layer.moe)))
                    for mode, m in models.items()}
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, config.vocab_size, (args.batch, args.prompt))
    canvas = rng.integers(3, config.vocab_size, (args.batch, config.canvas_length))
    f32 = dgemma_jax.from_pretrained(path, dtype="float32")
    logits = {name: np.asarray(m.canvas_logits(prompt, canvas), np.float32)
              for name, m in (("bf16", models["none"]), ("int8", models["int8"]), ("f32", f32))}
    report = dict(model=str(path), positions=int(canvas.size), moe_bytes_bf16=expert_bytes["none"],
                  moe_bytes_int8=expert_bytes["int8"],
                  int8_vs_bf16=_errors(logits["int8"], logits["bf16"]), bf16_vs_f32=_errors(logits["bf16"], logits["f32"]))
    print(f"model {path}  (bf16 weights; int8 = experts quantised)")
    print(f"MoE layer bytes: bf16 {expert_bytes['none'] / 1e6:.2f} MB, int8 + scales {expert_bytes['int8'] / 1e6:.2f} MB")
    print(f"canvas logits over {args.batch} x {config.canvas_length} positions (|err| in units of the reference's std):")
    for name in ("int8_vs_bf16", "bf16_vs_f32"):
        e = report[name]
        print(f"  {name.replace('_vs_', ' vs '):<13} max |err| {e['max_abs_err']:.4f}  mean |err| {e['mean_abs_err']:.5f}"
              f"  top-1 agreement {e['top1_agreement']:.4f}  mean KL {e['mean_kl']:.2e}")
    if args.puzzles:
        tokenizer = Tokenizer.load(path)
        pairs = list(sudoku.puzzles(args.seed, args.puzzles))
        ps, sols = [q for q, _ in pairs], [s for _, s in pairs]
        print(f"sudoku, {args.puzzles} puzzles (seed {args.seed}), givens clamped:")
        for mode, model in models.items():
            answers, steps = sudoku.solve_with_model(model, tokenizer, ps)
            score = dict(sudoku.score(ps, sols, answers), mean_steps=float(np.mean(steps)))
            report[f"sudoku_{mode}"] = score
            print(f"  {'bf16' if mode == 'none' else 'int8':<5} exact {score['exact']:.3f}  "
                  f"cells {score['cell_accuracy']:.3f}  mean steps {score['mean_steps']:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


def _errors(got, ref) -> dict[str, float]:
    """got vs ref logits [B, L, V]: |err| over ref's std (max, mean), top-1 agreement, mean KL(ref || got)."""
    import jax
    import numpy as np

    log_p, log_q = jax.nn.log_softmax(ref, -1), jax.nn.log_softmax(got, -1)
    return dict(max_abs_err=float(np.abs(got - ref).max() / ref.std()),
                mean_abs_err=float(np.abs(got - ref).mean() / ref.std()),
                top1_agreement=float((got.argmax(-1) == ref.argmax(-1)).mean()),
                mean_kl=float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), -1))))


if __name__ == "__main__":
    raise SystemExit(main())
