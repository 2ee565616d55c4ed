"""``dgemma generate``, ``chat`` and ``infill`` on the embedded default model (the Sudoku model:
these check the commands, not the quality of its free text)."""

import io

import pytest

from dgemma_jax import cli, default_model
from dgemma_jax.tokenizer import Tokenizer

FAST = ["--steps", "2", "--seed", "1"]


@pytest.fixture(scope="module")
def home():
    return default_model.default_model_dir()


def test_generate_two_prompts(capsys):
    assert cli.main(["generate", "The sky is", "Once upon a time", "--max-new-tokens", "20", *FAST]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) >= 2
    assert "tokens/forward" in err and "1 canvas(es)" in err


def test_generate_is_reproducible_and_seeded(capsys):
    runs = []
    for seed in ("1", "1", "2"):
        assert cli.main(["generate", "Hello", "--max-new-tokens", "16", "--steps", "2", "--seed", seed]) == 0
        runs.append(capsys.readouterr().out)
    assert runs[0] == runs[1] != runs[2]


def test_generate_show_denoising(capsys):
    assert cli.main(["generate", "--chat", "Hi", "--show-denoising", "--max-new-tokens", "16", *FAST]) == 0
    err = capsys.readouterr().err
    assert "[canvas 0 step  0]" in err and "[canvas 0 step  1]" in err


def test_chat_two_turns_from_stdin(capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\n\nhow are you\n"))
    assert cli.main(["chat", "--system", "Be brief.", "--max-new-tokens", "16", *FAST]) == 0
    err = capsys.readouterr().err
    assert err.count("tokens/forward") == 2  # two turns (the blank line is skipped)


def test_infill_keeps_prefix_and_suffix(capsys, home):
    assert cli.main(["infill", "--prefix", "The cat sat", "--suffix", " on the mat.", "--length", "5", *FAST]) == 0
    out = capsys.readouterr().out.rstrip("\n")
    assert out.startswith("The cat sat") and out.endswith(" on the mat.")
    assert Tokenizer.load(home).encode(out[len("The cat sat"):-len(" on the mat.")])  # something was written


def test_bad_model_dir_and_bad_flag(tmp_path, capsys):
    assert cli.main(["generate", "x", "--model", str(tmp_path / "missing")]) == 1
    assert "missing: not a directory" in capsys.readouterr().err
    assert cli.main(["generate", "x", "--entropy-bound", "-1", *FAST]) == 1
    assert "entropy_bound must be >= 0" in capsys.readouterr().err


def test_backend_flags_reach_the_model(capsys):
    """--moe-impl / --attention-impl switch the loaded model's back ends; unset keeps the config's."""
    from dgemma_jax.cli_text import _load

    parser = cli.build_parser()
    model, _ = _load(parser.parse_args(["generate", "x", "--moe-impl", "dense", "--attention-impl", "pallas"]))
    assert (model.config.moe_impl, model.config.attention_impl) == ("dense", "pallas")
    model, _ = _load(parser.parse_args(["generate", "x"]))
    assert (model.config.moe_impl, model.config.attention_impl) == ("auto", "xla")
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--moe-impl", "fast"])
    assert "invalid choice: 'fast'" in capsys.readouterr().err
