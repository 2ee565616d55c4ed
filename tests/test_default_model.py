"""The embedded default model: built once in the cache directory, atomically, then reused."""

import dataclasses
import json
from pathlib import Path

import pytest

import dgemma_jax
from dgemma_jax import default_model
from dgemma_jax.chat import ChatTemplate
from dgemma_jax.configs_io import load_model_config
from dgemma_jax.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]


def _fields(config) -> dict:
    """Config fields with rope as a dict (config.json round trips may reorder its layer types)."""
    fields = dataclasses.asdict(config)
    return {**fields, "rope": dict(fields["rope"])}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    home = tmp_path_factory.mktemp("dgemma-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DGEMMA_HOME", str(home))
        yield default_model.default_model_dir()


def test_builds_a_loadable_random_checkpoint(built):
    assert built.name == default_model.NAME and default_model.is_random_checkpoint(built)
    assert sorted(p.name for p in built.parent.iterdir()) == [default_model.NAME]  # no build leftovers
    model = dgemma_jax.from_pretrained(built)
    assert _fields(model.config) == _fields(default_model.model_config())
    tok = Tokenizer.load(built)
    assert tok.vocab_size <= model.config.vocab_size
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2) and tok.token_to_id("<turn|>") == 106
    assert json.loads((built / "generation_config.json").read_text()) == default_model.GENERATION_CONFIG
    prompt = ChatTemplate.load(built).render([{"role": "user", "content": "Hi"}])
    assert prompt == ChatTemplate.default().render([{"role": "user", "content": "Hi"}])
    assert max(tok.encode(prompt)) < model.config.vocab_size


def test_second_call_reuses_it(built, monkeypatch):
    monkeypatch.setenv("DGEMMA_HOME", str(built.parent))
    monkeypatch.setattr(default_model, "_build", lambda out: pytest.fail("rebuilt a complete checkpoint"))
    before = (built / "model.safetensors").stat().st_mtime_ns
    assert default_model.default_model_dir() == built
    assert (built / "model.safetensors").stat().st_mtime_ns == before


def test_incomplete_directory_is_rebuilt(built, tmp_path, monkeypatch):
    monkeypatch.setenv("DGEMMA_HOME", str(tmp_path))
    partial = tmp_path / default_model.NAME
    partial.mkdir()
    (partial / "config.json").write_text("{}")  # e.g. a directory someone emptied by hand
    out = default_model.default_model_dir()
    assert out == partial and default_model.is_random_checkpoint(out)
    assert (out / "model.safetensors").read_bytes() == (built / "model.safetensors").read_bytes()  # deterministic
    assert (out / "tokenizer.model").read_bytes() == (built / "tokenizer.model").read_bytes()


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("DGEMMA_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_model.cache_dir() == tmp_path / "xdg" / "dgemma-jax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_model.cache_dir() == tmp_path / "home" / ".cache" / "dgemma-jax"
    monkeypatch.setenv("DGEMMA_HOME", str(tmp_path / "mine"))
    assert default_model.cache_dir() == tmp_path / "mine"


def test_config_is_the_tiny_config():
    tiny = REPO / "configs" / "model" / "tiny.py"
    assert default_model.model_config() == load_model_config(tiny), (
        f"{tiny} and dgemma_jax/default_model.py disagree: change both, and bump default_model.NAME")


def test_is_random_checkpoint_false_without_marker(tmp_path):
    assert not default_model.is_random_checkpoint(tmp_path)
