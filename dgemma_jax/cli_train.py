"""``dgemma sudoku``, ``dgemma train`` and ``dgemma plot``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parsers(sub) -> None:
    from dgemma_jax.cli_text import _common

    p = sub.add_parser("sudoku", help="solve Sudoku puzzles read from stdin (one per line)",
                       description="Read puzzles from stdin, one per line: 81 characters, digits with 0 or . "
                                   "for a blank. Print one 81-digit solution per line. The givens are clamped "
                                   "in the canvas, so they are never overwritten. Uses the embedded Sudoku "
                                   "model unless --model is given.")
    p.add_argument("--no-clamp", action="store_true", help="let the model rewrite the givens too")
    p.add_argument("--batch-size", type=int, default=64, help="puzzles per generate call (default: %(default)s)")
    _common(p, max_new_tokens=False)
    p.set_defaults(func=cmd_sudoku)

    p = sub.add_parser("train", help="fine-tune or train from scratch (configs/train/*.py)",
                       description="Run the training loop of a config file; override any field with "
                                   "--config.SECTION.FIELD=VALUE (Python literals). Checkpoints, metrics.csv "
                                   "and the final HF export go to run.out_dir.")
    p.add_argument("--config", required=True, metavar="FILE", help="a configs/train/*.py file")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in run.out_dir")
    p.add_argument("--export-only", action="store_true",
                   help="do not train: export the latest checkpoint of run.out_dir (implies --resume)")
    p.add_argument("--no-export", action="store_true", help="skip the HF export at the end")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train, accepts_overrides=True)

    p = sub.add_parser("plot", help="draw training curves from a metrics.csv to PNG")
    p.add_argument("metrics", metavar="METRICS_CSV")
    p.add_argument("--out", default=None, help="PNG path (default: next to the CSV, loss.png)")
    p.add_argument("--metric", action="append", default=None,
                   help="column(s) to draw (default: loss, diffusion, ar)")
    p.set_defaults(func=cmd_plot)


def cmd_sudoku(args: argparse.Namespace) -> int:
    from dgemma_jax import sudoku
    from dgemma_jax.cli_text import _load, _sampler

    puzzles = []
    for number, line in enumerate(sys.stdin, start=1):
        if line.strip():
            puzzles.append(sudoku.parse_grid(line, what=f"stdin line {number}"))
    if not puzzles:
        raise ValueError("stdin: no puzzles (one per line, 81 characters, 0 or . for a blank)")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size={args.batch_size}: must be >= 1")
    model, tokenizer = _load(args)
    answers, steps = sudoku.solve_with_model(model, tokenizer, puzzles, clamp_givens=not args.no_clamp,
                                             seed=args.seed, batch_size=args.batch_size, **_sampler(args))
    for answer in answers:
        print(sudoku.grid_text(answer))
    valid = sum(sudoku.is_valid_solution(p, a) for p, a in zip(puzzles, answers))
    print(f"[{valid}/{len(puzzles)} valid solutions; {steps.mean():.1f} denoising steps on average]", file=sys.stderr)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from dgemma_jax.configs_io import apply_overrides, load_config_file
    from dgemma_jax.training.trainer import Trainer

    cfg = apply_overrides(load_config_file(args.config), args.overrides)
    trainer = Trainer(cfg)
    print(f"dgemma: data {trainer.data_cfg.path}: {trainer.data_stats}", file=sys.stderr)
    if not args.export_only:
        trainer.run(resume=args.resume, progress=not args.quiet)
    else:
        step = trainer.restore_latest()
        print(f"dgemma: restored step {step}", file=sys.stderr)
    if not args.no_export:
        out = trainer.export()
        print(f"dgemma: exported {out}", file=sys.stderr)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from dgemma_jax.training.metrics import plot

    out = Path(args.out) if args.out else Path(args.metrics).with_name("loss.png")
    plot(args.metrics, out, args.metric or ("loss", "diffusion", "ar"))
    print(out)
    return 0
