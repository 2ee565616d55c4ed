"""Reproduce the embedded Sudoku model from scratch, in one command:

    python train/sudoku.py --out runs/sudoku            # data + tokenizer, train, export, evaluate
    python train/sudoku.py --out runs/sudoku --install  # ... and copy the export into the package

Steps (each skipped when its output exists, so an interrupted run continues; training resumes
from its last checkpoint):
  1. ``prepare``: tokenizer (Gemma 4 specials + the Sudoku cell tokens), chat template and
     generation config in ``OUT/assets``; ``--puzzles`` unique-solution puzzles (28-40 givens,
     generator seed ``--data-seed``), each with ``--variants`` symmetric copies, in ``OUT/train.jsonl``.
  2. ``train``: ``configs/train/sudoku_scratch.py`` (any ``--config.x=y`` overrides pass through).
  3. ``export``: HF snapshot in ``OUT/export``.
  4. ``eval``: ``dgemma_jax.sudoku.evaluate`` on ``--eval-puzzles`` fresh puzzles (seed ``--eval-seed``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GENERATION_CONFIG = {
    "max_denoising_steps": 32, "t_min": 0.4, "t_max": 0.8, "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.1},
    "stability_threshold": 1, "confidence_threshold": 0.005, "eos_token_id": [1, 106, 50],
    "pad_token_id": 0, "bos_token_id": 2,
}
TRAIN_SEED, EVAL_SEED = 1, 20261124


def prepare(out: Path, puzzles: int, variants: int, seed: int, vocab_size: int) -> None:
    from dgemma_jax import sudoku
    from dgemma_jax.tokenizer import train_sentencepiece

    assets = out / "assets"
    if not (assets / "generation_config.json").is_file():
        pkg = resources.files("dgemma_jax").joinpath("assets")
        tmp = out / ".assets.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        train_sentencepiece([pkg.joinpath("default_corpus.txt").read_text(encoding="utf-8")], tmp / "tokenizer.model",
                            vocab_size, extra_symbols=sudoku.cell_symbols())
        (tmp / "chat_template.jinja").write_text(pkg.joinpath("chat_template.jinja").read_text(encoding="utf-8"))
        (tmp / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
        tmp.rename(assets)
    data = out / "train.jsonl"
    if not data.is_file():
        t0 = time.perf_counter()
        sudoku.write_jsonl(data, seed, puzzles, variants=variants, progress=True)
        print(f"prepare: {puzzles} x {variants} puzzles in {time.perf_counter() - t0:.0f} s -> {data}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/sudoku"))
    p.add_argument("--puzzles", type=int, default=8_000)
    p.add_argument("--variants", type=int, default=8)
    p.add_argument("--data-seed", type=int, default=TRAIN_SEED)
    p.add_argument("--eval-puzzles", type=int, default=200)
    p.add_argument("--eval-seed", type=int, default=EVAL_SEED)
    p.add_argument("--install", action="store_true", help="copy the export to dgemma_jax/assets/sudoku_model")
    args, overrides = p.parse_known_args(argv)
    if args.data_seed == args.eval_seed:
        p.error("--eval-seed must differ from --data-seed")

    from dgemma_jax import sudoku
    from dgemma_jax.configs_io import apply_overrides, load_config_file, load_model_config
    from dgemma_jax.training.trainer import Trainer

    cfg = load_config_file(ROOT / "configs/train/sudoku_scratch.py")
    cfg.model.config = str(ROOT / "configs/model/sudoku.py")
    cfg.model.assets = str(args.out / "assets")
    cfg.data.path = str(args.out / "train.jsonl")
    cfg.run.out_dir = str(args.out / "train")
    apply_overrides(cfg, overrides)
    prepare(args.out, args.puzzles, args.variants, args.data_seed, load_model_config(cfg.model.config).vocab_size)

    export = args.out / "export"
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    print(f"data: {trainer.data_stats}")
    trainer.run(resume=True)
    trainer.export(export)
    print(f"train + export: {time.perf_counter() - t0:.0f} s -> {export}")

    report = sudoku.evaluate(export, seed=args.eval_seed, count=args.eval_puzzles, progress=True)
    print(json.dumps(report, indent=2))
    (args.out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    if args.install:
        dest = ROOT / "dgemma_jax" / "assets" / "sudoku_model"
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(export, dest)
        print(f"installed -> {dest}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
