"""The public model object: compile reuse across prompt lengths, and clear errors."""

import numpy as np
import pytest

import dgemma_jax
from dgemma_jax import api
from dgemma_jax.config import ModelConfig

TINY = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_heads=2, head_dim=8, num_kv_heads=1,
                   global_head_dim=8, num_global_kv_heads=1, layer_types=("sliding_attention", "full_attention"),
                   sliding_window=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, canvas_length=4)


def test_prompt_lengths_in_one_bucket_share_one_compile():
    model = dgemma_jax.from_config(TINY, dtype="float32")
    rng = np.random.default_rng(0)
    canvas = rng.integers(0, 64, (1, 4))
    before = api._canvas_logits._cache_size()
    outs = [model.canvas_logits(rng.integers(0, 64, (1, t)), canvas) for t in (3, 9, 16)]
    assert api._canvas_logits._cache_size() == before + 1  # 3, 9 and 16 all pad to 16
    model.canvas_logits(rng.integers(0, 64, (1, 17)), canvas)
    assert api._canvas_logits._cache_size() == before + 2  # 17 needs the next bucket
    assert all(np.isfinite(np.asarray(o)).all() for o in outs)
    # (that the padding is invisible is shown by the parity tests: their prompts are not bucket-sized)


def test_missing_config_json(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"config\.json: not found"):
        dgemma_jax.from_pretrained(tmp_path)


def test_empty_prompt_is_rejected():
    model = dgemma_jax.from_config(TINY, dtype="float32")
    with pytest.raises(ValueError, match="at least one token"):
        model.canvas_logits(np.zeros((1, 0), np.int64), np.zeros((1, 4), np.int64))
