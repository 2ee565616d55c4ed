"""HF checkpoint loading and saving: round trips through transformers, sharding, errors, atomicity."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import dgemma_jax
from dgemma_jax import CheckpointError, ConfigError, checkpoint
from tests import oracle


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    ref = oracle.build(seed=3)
    return ref, oracle.save(ref, tmp_path_factory.mktemp("hf"))


def _inputs(seed=0, batch=2, t=11):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 128, (batch, t)), rng.integers(0, 128, (batch, 8))


def test_round_trip_through_transformers_is_exact(hf, tmp_path):
    ref, path = hf
    ours = dgemma_jax.from_pretrained(path, dtype="float32")
    out = ours.save_pretrained(tmp_path / "saved", max_shard_size="40KB")
    assert (out / checkpoint.INDEX_FILE).is_file(), "small max_shard_size must give a sharded checkpoint"
    back, info = oracle.load(out)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    prompt, canvas = _inputs()
    np.testing.assert_array_equal(oracle.canvas_logits(back, prompt, canvas), oracle.canvas_logits(ref, prompt, canvas))
    for name, tensor in back.state_dict().items():  # the vision tower is carried through too
        np.testing.assert_array_equal(tensor.numpy(), ref.state_dict()[name].numpy(), err_msg=name)


def test_sharded_transformers_checkpoint_loads(tmp_path):
    ref = oracle.build(seed=4)
    path = oracle.save(ref, tmp_path / "sharded", max_shard_size="30KB")
    assert (path / checkpoint.INDEX_FILE).is_file()
    ours = dgemma_jax.from_pretrained(path, dtype="float32")
    prompt, canvas = _inputs(1)
    np.testing.assert_allclose(np.asarray(ours.canvas_logits(prompt, canvas)), oracle.canvas_logits(ref, prompt, canvas), atol=1e-4)


def test_default_dtype_is_bfloat16(hf):
    ours = dgemma_jax.from_pretrained(hf[1])
    assert ours.module.embedding[...].dtype == jnp.bfloat16
    assert ours.module.layers[0].moe.gate[...].dtype == jnp.bfloat16
    prompt, canvas = _inputs()
    ref_logits = oracle.canvas_logits(hf[0], prompt, canvas)
    got = np.asarray(ours.canvas_logits(prompt, canvas))
    assert got.dtype == np.float32
    # bf16 keeps ~3 significant digits; logits are within the 30 soft-cap.
    assert np.abs(got - ref_logits).max() < 0.5


# ---- bad input --------------------------------------------------------------------------------


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_weights(path, edit):
    file = path / checkpoint.SINGLE_FILE
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def test_missing_directory():
    with pytest.raises(FileNotFoundError, match="nowhere"):
        dgemma_jax.from_pretrained("/nowhere/at/all")


def test_wrong_model_type(hf, tmp_path):
    path = _copy(hf[1], tmp_path / "c")
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "gemma3"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config\.json.*model_type is 'gemma3'"):
        dgemma_jax.from_pretrained(path)


def test_missing_tensor(hf, tmp_path):
    path = _copy(hf[1], tmp_path / "c")
    _edit_weights(path, lambda t: t.pop("model.decoder.layers.1.experts.down_proj"))
    with pytest.raises(CheckpointError, match=r"missing tensors.*model\.decoder\.layers\.1\.experts\.down_proj"):
        dgemma_jax.from_pretrained(path)


def test_misshapen_tensor(hf, tmp_path):
    path = _copy(hf[1], tmp_path / "c")
    key = "model.decoder.layers.0.self_attn.q_proj.weight"
    _edit_weights(path, lambda t: t.__setitem__(key, t[key][:-1]))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor .*q_proj\.weight: expected shape \(32, 32\), found \(31, 32\)"):
        dgemma_jax.from_pretrained(path)


def test_unexpected_tensor(hf, tmp_path):
    path = _copy(hf[1], tmp_path / "c")
    _edit_weights(path, lambda t: t.__setitem__("model.decoder.layers.0.mystery.weight", np.zeros(3, np.float32)))
    with pytest.raises(CheckpointError, match=r"unexpected tensors.*mystery"):
        dgemma_jax.from_pretrained(path)


def test_tied_copies_must_agree(hf, tmp_path):
    path = _copy(hf[1], tmp_path / "c")

    def add_encoder_copy(t):
        w = t["model.decoder.layers.2.mlp.up_proj.weight"].copy()
        w[0, 0] += 1.0
        t["model.encoder.language_model.layers.2.mlp.up_proj.weight"] = w

    _edit_weights(path, add_encoder_copy)
    with pytest.raises(CheckpointError, match=r"encoder\.language_model\.layers\.2\.mlp\.up_proj\.weight differs from its tied copy model\.decoder"):
        dgemma_jax.from_pretrained(path)


def test_identical_tied_copies_load(hf, tmp_path):
    path = _copy(hf[1], tmp_path / "c")

    def add_copies(t):
        t["model.encoder.language_model.layers.2.mlp.up_proj.weight"] = t["model.decoder.layers.2.mlp.up_proj.weight"]
        t["lm_head.weight"] = t["model.decoder.embed_tokens.weight"]

    _edit_weights(path, add_copies)
    dgemma_jax.from_pretrained(path)


def test_corrupt_file(hf, tmp_path):
    path = _copy(hf[1], tmp_path / "c")
    file = path / checkpoint.SINGLE_FILE
    file.write_bytes(file.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        dgemma_jax.from_pretrained(path)


def test_index_names_missing_shard(tmp_path):
    ref = oracle.build(seed=5)
    path = oracle.save(ref, tmp_path / "sharded", max_shard_size="30KB")
    shard = sorted(path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        dgemma_jax.from_pretrained(path)


def test_failed_save_leaves_nothing_half_written(hf, tmp_path, monkeypatch):
    ours = dgemma_jax.from_pretrained(hf[1], dtype="float32")
    out = ours.save_pretrained(tmp_path / "out")
    before = sorted(p.name for p in out.iterdir())
    calls = []

    def failing_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return save_file(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        ours.save_pretrained(tmp_path / "out", max_shard_size="40KB")
    assert sorted(p.name for p in out.iterdir()) == before  # the previous save is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no partial directories left
    dgemma_jax.from_pretrained(out, dtype="float32")


def test_torch_reads_our_bfloat16_save(hf, tmp_path):
    out = dgemma_jax.from_pretrained(hf[1]).save_pretrained(tmp_path / "bf16")
    back, _ = oracle.load(out)
    assert back.model.decoder.layers[0].experts.down_proj.dtype == torch.bfloat16


def test_save_refuses_to_replace_a_foreign_directory(hf, tmp_path):
    ours = dgemma_jax.from_pretrained(hf[1], dtype="float32")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="notes"):
        ours.save_pretrained(tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


def test_vision_tower_skipped_with_one_log_line(hf, caplog):
    with caplog.at_level("INFO", logger="dgemma_jax"):
        dgemma_jax.from_pretrained(hf[1], dtype="float32")
    lines = [r.getMessage() for r in caplog.records if "vision-tower" in r.getMessage()]
    assert len(lines) == 1 and str(hf[1]) in lines[0], lines


def test_canvas_logits_input_errors(hf):
    ours = dgemma_jax.from_pretrained(hf[1], dtype="float32")
    prompt, canvas = _inputs()
    with pytest.raises(ValueError, match=r"canvas_ids: expected shape \[batch, length\]"):
        ours.canvas_logits(prompt, canvas[0])
    with pytest.raises(ValueError, match="batch 2 but canvas_ids has batch 1"):
        ours.canvas_logits(prompt, canvas[:1])
    with pytest.raises(ValueError, match=r"prompt_ids: token ids must be in \[0, 128\)"):
        ours.canvas_logits(prompt + 1000, canvas)
    with pytest.raises(ValueError, match=r"self_conditioning_logits: expected shape \(2, 8, 128\)"):
        ours.canvas_logits(prompt, canvas, np.zeros((2, 8, 7), np.float32))
    with pytest.raises(ValueError, match="integer token ids"):
        ours.canvas_logits(prompt.astype(np.float32), canvas)
