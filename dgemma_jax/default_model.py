"""The embedded default model: what CLI commands use without ``--model``.

It is the Sudoku model (``configs/model/sudoku.py``, 1.8 M parameters) trained from scratch
by ``python train/sudoku.py --install`` and shipped inside the package as an HF snapshot:
config.json, model.safetensors, tokenizer.model (the Gemma 4 specials, the Sudoku cell tokens and
a few hundred text pieces), chat_template.jinja, generation_config.json. It solves Sudoku
(``dgemma sudoku``); its free text (``dgemma generate``/``chat``) is not meaningful.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

NAME = "sudoku_model"
FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.model", "chat_template.jinja")


def default_model_dir() -> Path:
    """The directory of the embedded Sudoku model. FileNotFoundError when the install lacks it."""
    path = Path(str(resources.files("dgemma_jax").joinpath("assets", NAME)))
    missing = [f for f in FILES if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{path}: the embedded default model is incomplete (missing {', '.join(missing)}); "
                                "reinstall dgemma-jax, or rebuild it with `python train/sudoku.py --install`")
    return path
