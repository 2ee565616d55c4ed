"""Reproduce the embedded Sudoku model from scratch, in one command:

    python train/sudoku.py --out runs/sudoku            # data + tokenizer, train, export, evaluate
    python train/sudoku.py --out runs/sudoku --install  # ... and copy the export into the package

The recipe is four stages of ``configs/train/sudoku_scratch.py`` on ``configs/model/sudoku.py``
(``STAGES`` below); each works in ``OUT/<stage>/`` and skips what it has already written, so an
interrupted run continues (training resumes from its last checkpoint):

  1. ``1-scratch``: from random weights on puzzles of generator seed 1, every cell supervised
     (the model learns to read the givens from the prompt and the rules).
  2. ``2-held-givens``: from stage 1's export, on puzzles of seed 2 whose symmetric copies hold
     their givens clean in the canvas (``dgemma_jax.sudoku.completion_segments``), as
     ``dgemma sudoku`` clamps them; the first copy of each puzzle still supervises every cell.
  3. ``3-more-held``: from stage 2's export, the same on new puzzles (seed 3) at a lower
     learning rate.
  4. ``4-more-held``: from stage 3's export, the same again on new puzzles (seed 4).

The tokenizer (Gemma 4 specials + the Sudoku cell tokens), chat template and generation config go
to ``OUT/assets``. The final export is ``OUT/<last stage>/export``; it is evaluated with
``dgemma_jax.sudoku.evaluate`` on ``--eval-puzzles`` fresh puzzles (seed ``--eval-seed``).
``--config.x=y`` overrides apply to every stage, after the stage's own settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The sampler settings every stage's export ships with (generate() and transformers read them from
# generation_config.json). Chosen on 200 validation puzzles (generator seed 777, used by neither
# training nor EVAL_SEED) with stage 4's model: exact solves 44.5 % at the settings shipped before
# (32 steps, t 0.8 -> 0.4, bound 0.1; it stops after 9 steps on average), 50 % at t 1.0 -> 0.6, 66 %
# here. At these temperatures the stable-and-confident stop almost never fires (63.7 of 64 steps
# on average): every cell is drawn again at every step, and the small entropy bound accepts few
# per step. See docs/training.md.
GENERATION_CONFIG = {
    "max_denoising_steps": 64, "t_min": 1.1, "t_max": 1.6, "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.01},
    "stability_threshold": 1, "confidence_threshold": 0.005, "eos_token_id": [1, 106, 50],
    "pad_token_id": 0, "bos_token_id": 2,
}
EVAL_SEED = 20261124


@dataclasses.dataclass(frozen=True)
class Stage:
    """One training stage: its data (``puzzles`` x ``variants`` from generator ``data_seed``) and
    the optimizer settings it overrides; every stage after the first starts from the one before."""

    name: str
    data_seed: int
    puzzles: int
    hold_givens: bool
    steps: int
    lr: float
    end_lr: float
    variants: int = 8


STAGES = (
    Stage("1-scratch", data_seed=1, puzzles=8_000, hold_givens=False, steps=2_000, lr=2e-3, end_lr=1e-4),
    Stage("2-held-givens", data_seed=2, puzzles=10_000, hold_givens=True, steps=4_400, lr=1e-3, end_lr=3e-5),
    Stage("3-more-held", data_seed=3, puzzles=10_000, hold_givens=True, steps=4_000, lr=5e-4, end_lr=1e-5),
    Stage("4-more-held", data_seed=4, puzzles=10_000, hold_givens=True, steps=4_000, lr=5e-4, end_lr=1e-5),
)


def prepare_assets(assets: Path, vocab_size: int) -> None:
    from dgemma_jax import sudoku
    from dgemma_jax.tokenizer import train_sentencepiece

    if (assets / "generation_config.json").is_file():
        return
    pkg = resources.files("dgemma_jax").joinpath("assets")
    tmp = assets.with_name(".assets.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    train_sentencepiece([pkg.joinpath("default_corpus.txt").read_text(encoding="utf-8")], tmp / "tokenizer.model",
                        vocab_size, extra_symbols=sudoku.cell_symbols())
    (tmp / "chat_template.jinja").write_text(pkg.joinpath("chat_template.jinja").read_text(encoding="utf-8"))
    (tmp / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
    tmp.rename(assets)


def prepare_data(path: Path, stage: Stage, puzzles: int) -> None:
    from dgemma_jax import sudoku

    if path.is_file():
        return
    t0 = time.perf_counter()
    sudoku.write_jsonl(path, stage.data_seed, puzzles, variants=stage.variants, hold_givens=stage.hold_givens,
                       progress=True)
    print(f"{stage.name}: {puzzles} x {stage.variants} puzzles in {time.perf_counter() - t0:.0f} s -> {path}")


def train_stage(stage: Stage, out: Path, init: Path | None, puzzles: int, overrides: list[str]) -> Path:
    """Runs (or resumes) one stage; returns its export directory."""
    from dgemma_jax.configs_io import apply_overrides, load_config_file, load_model_config
    from dgemma_jax.training.trainer import Trainer

    work = out / stage.name
    export = work / "export"
    if (export / "config.json").is_file():
        print(f"{stage.name}: done before -> {export}")
        return export
    cfg = load_config_file(ROOT / "configs/train/sudoku_scratch.py")
    if init is None:
        cfg.model.config, cfg.model.assets = str(ROOT / "configs/model/sudoku.py"), str(out / "assets")
    else:
        cfg.model.init, cfg.model.config, cfg.model.assets = str(init), "", ""
    cfg.data.path = str(work / "train.jsonl")
    cfg.run.out_dir = str(work / "train")
    cfg.run.steps, cfg.optim.lr, cfg.optim.end_lr = stage.steps, stage.lr, stage.end_lr
    apply_overrides(cfg, overrides)
    if init is None:
        prepare_assets(out / "assets", load_model_config(cfg.model.config).vocab_size)
    prepare_data(work / "train.jsonl", stage, puzzles)

    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    print(f"{stage.name}: data {trainer.data_stats}")
    trainer.run(resume=True)
    trainer.export(export)
    print(f"{stage.name}: train + export {time.perf_counter() - t0:.0f} s -> {export}")
    return export


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/sudoku"))
    p.add_argument("--puzzles", type=int, default=None, help="puzzles per stage (default: the stage's own count)")
    p.add_argument("--eval-puzzles", type=int, default=200)
    p.add_argument("--eval-seed", type=int, default=EVAL_SEED)
    p.add_argument("--install", action="store_true", help="copy the export to dgemma_jax/assets/sudoku_model")
    args, overrides = p.parse_known_args(argv)
    if args.eval_seed in {s.data_seed for s in STAGES}:
        p.error(f"--eval-seed {args.eval_seed} is a training data seed")

    from dgemma_jax import sudoku

    export = None
    for stage in STAGES:
        export = train_stage(stage, args.out, export, args.puzzles or stage.puzzles, overrides)

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
