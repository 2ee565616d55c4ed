"""The embedded default model: the trained Sudoku model shipped in the package."""

import json
from pathlib import Path

import jax.numpy as jnp

import dgemma_jax
from dgemma_jax import default_model, sudoku
from dgemma_jax.configs_io import load_model_config
from dgemma_jax.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]


def test_ships_complete_and_matches_the_sudoku_config():
    path = default_model.default_model_dir()
    model = dgemma_jax.from_pretrained(path, dtype=jnp.float32)
    expected = load_model_config(ROOT / "configs/model/sudoku.py")
    def fields(c):  # rope entries compared as a mapping (config.json stores them sorted)
        return {**c.__dict__, "rope": dict(c.rope), "moe_impl": None}

    assert fields(model.config) == fields(expected)
    assert model.generation_config["max_denoising_steps"] >= 1
    tok = Tokenizer.load(path)
    assert tok.vocab_size == model.config.vocab_size
    assert [tok.token_to_id(s) for s in sudoku.cell_symbols()] == list(range(107, 107 + 819))


def test_ships_the_recipes_sampler_settings(sudoku_recipe):
    """The embedded generation_config.json is what train/sudoku.py writes (settings tuned there)."""
    shipped = json.loads((default_model.default_model_dir() / "generation_config.json").read_text())
    assert shipped == sudoku_recipe.GENERATION_CONFIG


def test_missing_files_are_named(monkeypatch, tmp_path):
    monkeypatch.setattr(default_model, "resources", _FakeResources(tmp_path))
    (tmp_path / "assets" / default_model.NAME).mkdir(parents=True)
    try:
        default_model.default_model_dir()
    except FileNotFoundError as e:
        assert "config.json" in str(e) and "train/sudoku.py --install" in str(e)
    else:
        raise AssertionError("no error for an empty model directory")


class _FakeResources:
    def __init__(self, root):
        self.root = root

    def files(self, _package):
        return self.root
