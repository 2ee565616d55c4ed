"""Sudoku solve rates: dgemma_jax and transformers' own ``generate`` on the same exported checkpoint.

Run (from the repository root):

    PYTHONPATH=. .venv/bin/python bench/sudoku.py [--model DIR] [--puzzles 200] [--seed 20261124]

``--model`` defaults to the embedded default model. The puzzles (28-40 givens, unique solutions)
come from ``dgemma_jax.sudoku.puzzles(--seed)``; train/sudoku.py trains on seed 1, so the default
seed here gives puzzles the training never saw. Rows:
  ours, full, givens clamped   what ``dgemma sudoku`` does (the givens cannot be overwritten)
  ours, full, unclamped        the plain sampler: the model must also copy the givens
  ours, one step, clamped      a single denoising step, then commit
  transformers, full, ...      ``DiffusionGemmaForBlockDiffusion.generate`` with the checkpoint's
                               generation_config.json; "givens clamped" pins them the way ours
                               does, with its own hooks: the first canvas (``decoder_input_ids``)
                               holds them and a logits processor puts all their mass on them
exact = a valid grid that keeps every given; cell accuracy = blanks equal to the unique solution.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--puzzles", type=int, default=200)
    p.add_argument("--seed", type=int, default=20261124)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    import numpy as np
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    import jax.numpy as jnp
    from transformers import DiffusionGemmaForBlockDiffusion, LogitsProcessor, LogitsProcessorList

    class PinTokens(LogitsProcessor):
        """Canvas logits [B, L, V]: positions with a pin >= 0 get all their mass on that token."""

        def __init__(self, pins):
            self.pins = pins  # [B, L] long, -1 where free

        def __call__(self, input_ids, scores):  # two parameters: transformers then passes no extras
            pinned = torch.full_like(scores, float("-inf")).scatter(-1, self.pins.clamp(min=0)[..., None], 0.0)
            return torch.where((self.pins >= 0)[..., None], pinned, scores)

    import dgemma_jax
    from dgemma_jax import sudoku
    from dgemma_jax.default_model import default_model_dir
    from dgemma_jax.tokenizer import Tokenizer

    path = args.model or str(default_model_dir())
    tok = Tokenizer.load(path)
    model = dgemma_jax.from_pretrained(path, dtype=jnp.float32)
    pairs = list(sudoku.puzzles(args.seed, args.puzzles))
    ps, sols = [p for p, _ in pairs], [s for _, s in pairs]
    results = {}
    runs = {"ours, full, givens clamped": dict(clamp_givens=True),
            "ours, full, unclamped": dict(clamp_givens=False),
            "ours, one step, clamped": dict(clamp_givens=True, max_denoising_steps=1)}
    for name, kw in runs.items():
        t0 = time.perf_counter()
        answers, steps = sudoku.solve_with_model(model, tok, ps, batch_size=args.batch, **kw)
        results[name] = dict(sudoku.score(ps, sols, answers), mean_steps=float(np.mean(steps)),
                             seconds=time.perf_counter() - t0)

    tm = DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=torch.float32).eval()
    torch.manual_seed(args.seed)
    for name, clamp in (("transformers, full, givens clamped", True), ("transformers, full, unclamped", False)):
        answers, steps = [], []
        t0 = time.perf_counter()
        for start in range(0, len(ps), args.batch):
            chunk = ps[start:start + args.batch]
            prompt = torch.from_numpy(sudoku.encode_prompts(tok, chunk).astype(np.int64))
            kw = {}
            if clamp:  # the same clamping as ours: pinned in the first canvas and in every step's logits
                pins = torch.from_numpy(sudoku.clamp_ids(tok, chunk))
                canvas = torch.randint(tm.config.text_config.vocab_size, pins.shape)
                kw = dict(decoder_input_ids=torch.where(pins >= 0, pins, canvas),
                          logits_processor=LogitsProcessorList([PinTokens(pins)]))
            with torch.no_grad():
                out = tm.generate(prompt, max_new_tokens=82, **kw)
            answers.extend(sudoku.read_answers(tok, out.sequences[:, 82:].numpy()))
            steps.extend((82 / out.tokens_per_forward.numpy()).tolist())
        results[name] = dict(sudoku.score(ps, sols, answers), mean_steps=float(np.mean(steps)),
                             seconds=time.perf_counter() - t0)

    print(f"model: {path} | {args.puzzles} puzzles, generator seed {args.seed}, 28-40 givens")
    print(f"{'':<36}{'exact':>8}{'cell acc':>10}{'givens kept':>13}{'steps':>8}{'seconds':>9}")
    for name, r in results.items():
        print(f"{name:<36}{r['exact']:>8.1%}{r['cell_accuracy']:>10.1%}{r['givens_kept']:>13.1%}"
              f"{r['mean_steps']:>8.1f}{r['seconds']:>9.1f}")
    print("(transformers' steps: 82 / tokens_per_forward)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(model=path, seed=args.seed, puzzles=args.puzzles, results=results), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
