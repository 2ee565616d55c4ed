"""The ``dgemma`` CLI, run in-process, and the ml_collections config files."""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import dgemma_jax
from dgemma_jax import checkpoint, cli
from dgemma_jax.config import ModelConfig
from dgemma_jax.configs_io import load_model_config, model_config_from_dict, model_config_to_dict

ROOT = Path(__file__).resolve().parents[1]
SLIDING, FULL = "sliding_attention", "full_attention"

TINY = ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_heads=4, head_dim=8, num_kv_heads=2,
    global_head_dim=16, num_global_kv_heads=1, layer_types=(SLIDING, SLIDING, FULL), sliding_window=4,
    num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, canvas_length=8,
)


def _write_snapshot(path: Path, config: ModelConfig, seed: int = 3) -> None:
    """A random float32 HF snapshot, built on the host with numpy.

    (``from_config(...).save_pretrained`` gives the same layout, but its random init compiles one
    XLA program per parameter shape: ~10-20 s on a 2-core machine, too slow for a unit test.)
    """
    rng = np.random.default_rng(seed)

    def tensors():
        for spec in checkpoint.tensor_specs(config):
            if len(spec.hf_shape) == 1:  # norms, scalars, router scales: around 1
                arr = 1.0 + 0.1 * rng.standard_normal(spec.hf_shape)
            else:
                arr = 0.05 * rng.standard_normal(spec.hf_shape)
            yield checkpoint.DECODER + spec.name, arr.astype(np.float32)

    config_json = config.to_hf_dict()
    config_json["dtype"] = "float32"
    checkpoint.write_checkpoint(path, tensors(), config_json)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A float32 snapshot with a side file (generation_config.json) to carry along."""
    path = tmp_path_factory.mktemp("cli") / "src"
    _write_snapshot(path, TINY)
    (path / "generation_config.json").write_text(json.dumps({"max_denoising_steps": 48}))
    return path


@pytest.fixture(scope="module")
def source_logits(source) -> np.ndarray:
    return _logits(source)


def _logits(path: Path) -> np.ndarray:
    model = dgemma_jax.from_pretrained(path, dtype="float32")
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, TINY.vocab_size, (2, 5))
    canvas = rng.integers(0, TINY.vocab_size, (2, TINY.canvas_length))
    return np.asarray(model.canvas_logits(prompt, canvas))


def test_convert_round_trip(source, source_logits, tmp_path, capsys):
    dst = tmp_path / "out"
    assert cli.main(["convert", str(source), str(dst), "--quiet"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert np.isfinite(source_logits).all() and source_logits.std() > 0
    assert (dst / "model.safetensors").is_file()
    assert not (dst / "model.safetensors.index.json").exists()
    assert json.loads((dst / "config.json").read_text())["dtype"] == "float32"  # source dtype kept
    assert (dst / "generation_config.json").read_text() == (source / "generation_config.json").read_text()
    np.testing.assert_array_equal(_logits(dst), source_logits)


def test_convert_to_orbax_and_back(source, source_logits, tmp_path, capsys):
    native, back = tmp_path / "native", tmp_path / "back"
    assert cli.main(["convert", str(source), str(native), "--to", "orbax", "--quiet"]) == 0
    assert (native / "params").is_dir() and not list(native.glob("*.safetensors"))
    np.testing.assert_array_equal(_logits(native), source_logits)
    assert cli.main(["convert", str(native), str(back), "--quiet"]) == 0
    assert (back / "model.safetensors").is_file()
    np.testing.assert_array_equal(_logits(back), source_logits)


def test_convert_small_shards_writes_index(source, source_logits, tmp_path):
    dst = tmp_path / "sharded"
    assert cli.main(["convert", str(source), str(dst), "--max-shard-size", "64KB", "-q"]) == 0
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert sorted(p.name for p in dst.glob("*.safetensors")) == shards
    np.testing.assert_array_equal(_logits(dst), source_logits)


def test_convert_to_bfloat16(source, tmp_path):
    dst = tmp_path / "bf16"
    assert cli.main(["convert", str(source), str(dst), "--dtype", "bfloat16", "-q"]) == 0
    assert json.loads((dst / "config.json").read_text())["dtype"] == "bfloat16"
    assert dgemma_jax.from_pretrained(dst).dtype == jnp.bfloat16


def test_convert_missing_source(tmp_path, capsys):
    missing = tmp_path / "no-such-snapshot"
    assert cli.main(["convert", str(missing), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("dgemma: error: ")
    assert str(missing) in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_convert_bad_checkpoint(source, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((source / "config.json").read_text())
    assert cli.main(["convert", str(broken), str(tmp_path / "out"), "-q"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("dgemma: error: ") and "safetensors" in err


def test_convert_refuses_to_replace_non_checkpoint(source, tmp_path, capsys):
    dst = tmp_path / "precious"
    dst.mkdir()
    (dst / "notes.txt").write_text("keep me")
    assert cli.main(["convert", str(source), str(dst), "-q"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(["convert", str(source), str(dst), "-q", "--overwrite"]) == 1
    assert "config.json" in capsys.readouterr().err
    assert (dst / "notes.txt").read_text() == "keep me"


def test_convert_overwrite_existing_checkpoint(source, tmp_path):
    dst = tmp_path / "again"
    assert cli.main(["convert", str(source), str(dst), "-q"]) == 0
    assert cli.main(["convert", str(source), str(dst), "-q"]) == 1
    assert cli.main(["convert", str(source), str(dst), "-q", "--overwrite", "--max-shard-size", "64KB"]) == 0
    assert (dst / "model.safetensors.index.json").is_file()
    assert not (dst / "model.safetensors").exists()


def test_info_snapshot(source, capsys):
    assert cli.main(["info", str(source)]) == 0
    out = capsys.readouterr().out
    assert "layers       3 (2 sliding, 1 full" in out
    assert "experts      4 x 16, top-2" in out
    assert "dtype float32" in out


def test_info_config_file(capsys):
    assert cli.main(["info", str(ROOT / "configs/model/diffusiongemma_26b_a4b.py")]) == 0
    out = capsys.readouterr().out
    assert "layers       30 (25 sliding, 5 full" in out
    assert "experts      128 x 704, top-8" in out


def test_info_missing_path(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert cli.main(["info", str(missing)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("dgemma: error: ") and str(missing) in err


def test_help_lists_only_working_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("convert", "info", "generate", "chat", "infill", "sudoku", "train", "plot", "plan", "serve"):
        assert command in out


def test_26b_config_matches_spec():
    config = load_model_config(ROOT / "configs/model/diffusiongemma_26b_a4b.py")
    assert config == ModelConfig()
    assert config.num_layers == 30 and config.layer_types[5::6] == (FULL,) * 5
    assert config.rope_for(FULL).partial_rotary_factor == 0.25


@pytest.mark.parametrize("name", ["diffusiongemma_26b_a4b", "bench", "tiny"])
def test_config_files_round_trip(name):
    config = load_model_config(ROOT / f"configs/model/{name}.py")
    assert config.layer_types[-1] == FULL
    assert model_config_from_dict(model_config_to_dict(config)) == config


def test_config_dict_rejects_unknown_field():
    data = model_config_to_dict(TINY)
    data.hiden_size = 3
    with pytest.raises(dgemma_jax.ConfigError, match="hiden_size"):
        model_config_from_dict(data)
