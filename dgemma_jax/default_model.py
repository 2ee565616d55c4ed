"""The embedded default model: what CLI commands use without ``--model``.

Until a trained model ships, it is a tiny checkpoint with **random weights**, built on first use
in the cache directory (``$DGEMMA_HOME``, else ``$XDG_CACHE_HOME/dgemma-jax``, else
``~/.cache/dgemma-jax``): the tiny test config, a SentencePiece tokenizer trained on a short text
shipped with the package (special tokens at the Gemma 4 ids), our Gemma 4 chat template and the
DiffusionGemma generation defaults scaled to a 16-token canvas. The build is atomic: the
checkpoint is written into a temporary sibling and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from importlib import resources
from pathlib import Path

from dgemma_jax.config import FULL, SLIDING, ModelConfig
from dgemma_jax.configs_io import model_config_from_dict

NAME = "default-random-v1"
MARKER = "RANDOM_WEIGHTS.txt"
FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.model",
         "chat_template.jinja", MARKER)

# configs/model/tiny.py (configs/ is not part of the installed package). Pinned here: a cached
# default-random-v1 must not change when that file does; change NAME together with these values.
_CONFIG = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_heads=4, head_dim=16, num_kv_heads=2,
    global_head_dim=32, num_global_kv_heads=1, layer_types=[SLIDING, SLIDING, SLIDING, FULL],
    sliding_window=8,
    rope={
        SLIDING: dict(rope_type="default", theta=10_000.0, partial_rotary_factor=1.0, factor=1.0),
        FULL: dict(rope_type="proportional", theta=1_000_000.0, partial_rotary_factor=0.25, factor=1.0),
    },
    num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, rms_norm_eps=1e-6,
    final_logit_softcap=30.0, hidden_activation="gelu_pytorch_tanh", canvas_length=16,
    pad_token_id=0, bos_token_id=2, eos_token_ids=[1, 106, 50], moe_impl="auto", attention_impl="xla",
)
GENERATION_CONFIG = {
    "max_denoising_steps": 16, "t_min": 0.4, "t_max": 0.8, "sampler_config": {"entropy_bound": 0.1},
    "stability_threshold": 1, "confidence_threshold": 0.005, "eos_token_id": [1, 106, 50],
    "pad_token_id": 0, "bos_token_id": 2,
}
_MARKER_TEXT = """\
This checkpoint has RANDOM WEIGHTS. It is dgemma-jax's placeholder default model ({name}), built
on this machine on first use so that commands run without --model; its output is noise. Use
--model with a trained DiffusionGemma checkpoint for real results. Delete this directory to
have it rebuilt.
"""


def model_config() -> ModelConfig:
    """The default model's config (the values of ``configs/model/tiny.py``)."""
    return model_config_from_dict(_CONFIG, source=f"dgemma_jax.default_model ({NAME})")


def cache_dir() -> Path:
    """``$DGEMMA_HOME``, else ``$XDG_CACHE_HOME/dgemma-jax``, else ``~/.cache/dgemma-jax``."""
    if os.environ.get("DGEMMA_HOME"):
        return Path(os.environ["DGEMMA_HOME"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "dgemma-jax"


def default_model_dir() -> Path:
    """The default model's snapshot directory, built on first use (a few seconds)."""
    out = cache_dir() / NAME
    if not _is_complete(out):
        _build(out)
    return out


def is_random_checkpoint(path: str | os.PathLike) -> bool:
    """Whether the snapshot at ``path`` carries the random-weights marker."""
    return (Path(path) / MARKER).is_file()


def _is_complete(path: Path) -> bool:
    return all((path / f).is_file() for f in FILES)


def _build(out: Path) -> None:
    import jax.numpy as jnp

    from dgemma_jax.api import from_config
    from dgemma_jax.checkpoint import swap_in
    from dgemma_jax.tokenizer import train_sentencepiece

    print(f"dgemma: building the default model (random weights) in {out}", file=sys.stderr)
    config = model_config()
    out.parent.mkdir(parents=True, exist_ok=True)
    assets = resources.files("dgemma_jax").joinpath("assets")
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.build-", dir=out.parent) as work:
        tmp = Path(work) / NAME
        from_config(config, seed=0, dtype=jnp.float32).save_pretrained(tmp)
        train_sentencepiece([assets.joinpath("default_corpus.txt").read_text(encoding="utf-8")],
                            tmp / "tokenizer.model", vocab_size=config.vocab_size)
        (tmp / "chat_template.jinja").write_text(assets.joinpath("chat_template.jinja").read_text(encoding="utf-8"),
                                                 encoding="utf-8")
        (tmp / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
        (tmp / MARKER).write_text(_MARKER_TEXT.format(name=NAME))
        try:
            os.rename(tmp, out)  # fails if out exists and is not empty
        except OSError:
            if _is_complete(out):  # another process finished first; its files equal ours
                return
            if out.exists():  # an incomplete directory left by hand: replace it
                swap_in(tmp, out)
            else:
                raise
    print(f"dgemma: default model ready ({out})", file=sys.stderr)
