"""The public model object: ``from_pretrained``, ``canvas_logits``, ``save_pretrained``."""

from __future__ import annotations

import functools
import itertools
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from dgemma_jax import checkpoint, native, quant
from dgemma_jax.cache import KVCache
from dgemma_jax.config import ModelConfig, load_hf_config
from dgemma_jax.layers import host_init
from dgemma_jax.model import DiffusionGemma
from dgemma_jax.sharding import RULES, variable_sharding

DEFAULT_DTYPE = jnp.bfloat16


class Model:
    """A loaded DiffusionGemma: the NNX module plus what came with its checkpoint.

    The forward passes are jitted once per (batch, prompt-length bucket, canvas length) shape.
    ``graphdef``/``state`` are the module split once for those jitted calls.
    """

    def __init__(self, module: DiffusionGemma, hf_config: dict[str, Any] | None = None,
                 source_dir: Path | None = None, passthrough=(), mesh: Mesh | None = None):
        self.module = module
        self.config: ModelConfig = module.config
        self.hf_config = hf_config
        self.source_dir = source_dir
        self.mesh = mesh
        self._passthrough = list(passthrough)
        # read now: generate() must not depend on the snapshot directory still being there
        self.generation_config: dict[str, Any] = self._read_generation_config(source_dir)
        self.graphdef, self.state = nnx.split(module)

    @property
    def dtype(self):
        return self.module.dtype

    @staticmethod
    def _read_generation_config(source_dir: Path | None) -> dict[str, Any]:
        """The checkpoint's ``generation_config.json`` ({} when there is none)."""
        path = source_dir / "generation_config.json" if source_dir else None
        if path is None or not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text())
        except ValueError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object")
        return data

    # ---- forward passes --------------------------------------------------------------------
    def canvas_logits(self, prompt_ids, canvas_ids, self_conditioning_logits=None) -> jax.Array:
        """Encodes ``prompt_ids`` [B, T] causally, then denoises ``canvas_ids`` [B, L].

        ``self_conditioning_logits`` [B, L, V] or None (zero signal). Returns float32 logits
        [B, L, V], equal to transformers' ``DiffusionGemmaForBlockDiffusion(input_ids=prompt_ids,
        decoder_input_ids=canvas_ids, self_conditioning_logits=...).logits``.
        """
        prompt, canvas = _as_tokens(prompt_ids, "prompt_ids"), _as_tokens(canvas_ids, "canvas_ids")
        if prompt.shape[0] != canvas.shape[0]:
            raise ValueError(f"prompt_ids has batch {prompt.shape[0]} but canvas_ids has batch {canvas.shape[0]}")
        expected = (*canvas.shape, self.config.vocab_size)
        if self_conditioning_logits is None:  # zero signal; same compiled function as with logits
            sc_logits, sc_mask = jnp.zeros(expected, jnp.float32), jnp.zeros(canvas.shape[:1], bool)
        elif tuple(self_conditioning_logits.shape) != expected:
            raise ValueError(
                f"self_conditioning_logits: expected shape {expected}, found {tuple(self_conditioning_logits.shape)}"
            )
        else:
            sc_logits, sc_mask = jnp.asarray(self_conditioning_logits, jnp.float32), jnp.ones(canvas.shape[:1], bool)
        self._check_vocab(prompt, "prompt_ids")
        self._check_vocab(canvas, "canvas_ids")
        padded, num_valid = self._pad_prompt(prompt)
        return _canvas_logits(self.graphdef, self.state, padded, num_valid, canvas, sc_logits, sc_mask)

    def encoder_logits(self, prompt_ids) -> jax.Array:
        """Autoregressive (encoder pass) logits [B, T, V], float32: position t predicts token t+1."""
        prompt = _as_tokens(prompt_ids, "prompt_ids")
        self._check_vocab(prompt, "prompt_ids")
        padded, num_valid = self._pad_prompt(prompt)
        return _encoder_logits(self.graphdef, self.state, padded, num_valid)[:, : prompt.shape[1]]

    def _pad_prompt(self, prompt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Right-pads the prompt to a length bucket so that nearby lengths share one compiled pass;
        the padding is written to the cache but never counted or attended to."""
        b, t = prompt.shape
        if t < 1:
            raise ValueError("prompt_ids: needs at least one token")
        padded = np.full((b, prompt_bucket(t)), self.config.pad_token_id, np.int32)
        padded[:, :t] = prompt
        return padded, np.full((b,), t, np.int32)

    def _check_vocab(self, tokens: np.ndarray, name: str) -> None:
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.config.vocab_size):
            raise ValueError(f"{name}: token ids must be in [0, {self.config.vocab_size}), found "
                             f"[{tokens.min()}, {tokens.max()}]")

    # ---- saving ----------------------------------------------------------------------------
    def save_pretrained(self, out_dir, max_shard_size: str | int = "5GB", progress: bool = False) -> Path:
        """Writes an HF snapshot (config.json, safetensors [+ index], generation/tokenizer files)
        that transformers' ``from_pretrained`` loads. The write is atomic."""
        self._check_savable()
        out_dir = Path(out_dir)
        tensors = checkpoint.iter_hf_tensors(self.module, self.config)
        passthrough = checkpoint.passthrough_tensors(self._passthrough)
        config_json = self.config.to_hf_dict(self.hf_config)
        config_json["dtype"] = str(np.dtype(self.dtype))
        count = len(checkpoint.tensor_specs(self.config)) + len(self._passthrough)
        with tqdm(total=count, desc=f"saving {out_dir.name}", unit="tensor", disable=not progress) as bar:
            checkpoint.write_checkpoint(
                out_dir, itertools.chain(tensors, passthrough), config_json, self._side_files(),
                checkpoint.parse_size(max_shard_size), progress=bar.update,
            )
        return out_dir

    def save_orbax(self, out_dir) -> Path:
        """Writes our native format: config.json + an orbax checkpoint of the parameters (restores
        shard by shard onto a mesh). ``from_pretrained`` reads it back."""
        self._check_savable()
        return native.save(self.module, Path(out_dir), self.config.to_hf_dict(self.hf_config), self._side_files())

    def _check_savable(self) -> None:
        if quant.is_quantized(self.module):
            raise ValueError("this model's experts are quantised (int8, for serving); save the model loaded "
                             "without quantize= instead")

    def _side_files(self) -> list[Path]:
        src = self.source_dir
        return [src / f for f in checkpoint.SIDE_FILES if src and (src / f).is_file()]


def _as_tokens(x, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected shape [batch, length], found {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name}: expected integer token ids, found dtype {arr.dtype}")
    return arr.astype(np.int32)


def _encode_prompt(model: DiffusionGemma, prompt, num_valid):
    """``model.encode`` of the bucketed prompt [B, T] into a fresh cache for its T positions
    (``KVCache.for_positions``) -> (hidden [B, T, H], cache)."""
    cache = KVCache.for_positions(model.config, prompt.shape[0], prompt.shape[1], model.dtype)
    return model.encode(prompt, cache, num_valid)


@functools.partial(jax.jit, static_argnums=0)
def _canvas_logits(graphdef, state, prompt, num_valid, canvas, sc_logits, sc_mask):
    model = nnx.merge(graphdef, state)
    _, cache = _encode_prompt(model, prompt, num_valid)
    return model.denoise(canvas, cache, sc_logits, sc_mask)


@functools.partial(jax.jit, static_argnums=0)
def _encoder_logits(graphdef, state, prompt, num_valid):
    model = nnx.merge(graphdef, state)
    hidden, _ = _encode_prompt(model, prompt, num_valid)
    return model.logits(hidden)


def prompt_bucket(length: int) -> int:
    """Padded prompt length: powers of two from 16 up to 1024, then multiples of 1024."""
    if length > 1024:
        return -(-length // 1024) * 1024
    return max(16, 1 << (length - 1).bit_length())


def from_config(config: ModelConfig, seed: int = 0, dtype=DEFAULT_DTYPE, mesh: Mesh | None = None, rules=RULES,
                quantize: str = "none") -> Model:
    """A randomly initialised model (for tests, benchmarks and training from scratch).

    Values are drawn on the host one tensor at a time (no per-shape XLA compiles) and placed
    directly with their sharding when ``mesh`` is given. ``quantize="int8"``: int8 experts
    (``dgemma_jax.quant``; serving only).
    """
    abstract = nnx.eval_shape(lambda: DiffusionGemma(config, rngs=nnx.Rngs(0), dtype=jnp.dtype(dtype), mesh=mesh))
    rng = np.random.default_rng(seed)
    for _, var in nnx.iter_graph(abstract):
        if isinstance(var, nnx.Variable):
            sharding = variable_sharding(var, mesh, rules) if mesh is not None else None
            var.set_value(jax.device_put(host_init(var, rng), sharding))
    return Model(quant.quantize(abstract, quantize), mesh=mesh)


def from_pretrained(path, dtype=None, mesh: Mesh | None = None, rules=RULES, progress: bool = False,
                    quantize: str = "none", **config_overrides) -> Model:
    """Loads a Hugging Face snapshot directory (config.json, *.safetensors [+ index json], ...),
    or our native orbax format (``Model.save_orbax``).

    ``dtype``: parameter dtype (default bfloat16). ``mesh``: place parameters sharded by ``rules``.
    ``quantize="int8"``: int8 experts with per-channel scales, for serving (``dgemma_jax.quant``).
    ``config_overrides``: back-end switches such as ``moe_impl="dense"``.
    """
    if quantize not in quant.MODES:
        raise ValueError(f"quantize={quantize!r}: expected one of {', '.join(quant.MODES)}")
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a directory (expected a Hugging Face snapshot)")
    config, raw = load_hf_config(path)
    config = config.replace(**config_overrides) if config_overrides else config
    dtype = jnp.dtype(dtype or DEFAULT_DTYPE)
    abstract = nnx.eval_shape(lambda: DiffusionGemma(config, rngs=nnx.Rngs(0), dtype=dtype, mesh=mesh))
    sharding_of = (lambda var: variable_sharding(var, mesh, rules)) if mesh is not None else None
    if native.is_native(path):
        native.restore(path, abstract, dtype, sharding_of)
        return Model(quant.quantize(abstract, quantize), hf_config=raw, source_dir=path, mesh=mesh)
    total = len(checkpoint.tensor_specs(config))
    with tqdm(total=total, desc=f"loading {path.name}", unit="tensor", disable=not progress) as bar:
        passthrough = checkpoint.load_params(path, config, abstract, dtype, sharding_of, progress=bar.update)
    return Model(quant.quantize(abstract, quantize), hf_config=raw, source_dir=path, passthrough=passthrough,
                 mesh=mesh)
