"""Model configuration: a frozen dataclass, built from (and written back to) an HF ``config.json``."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

SLIDING = "sliding_attention"
FULL = "full_attention"
_SUPPORTED_ACTIVATIONS = ("gelu_pytorch_tanh",)
MOE_IMPLS = ("auto", "ragged", "pallas", "pallas_gpu", "tiled", "bucketed", "dense")
ATTENTION_IMPLS = ("xla", "pallas", "pallas_gpu")


class ConfigError(ValueError):
    """A config.json (or a config value) that this implementation cannot honour."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of one layer type.

    ``default``: every dimension rotates, frequencies ``theta^(-2i/rotary_dim)``.
    ``proportional``: the first ``partial_rotary_factor`` of the head rotates with frequencies
    ``theta^(-2i/head_dim)``; the rest of the head is left unrotated.
    """

    rope_type: str = "default"
    theta: float = 10_000.0
    partial_rotary_factor: float = 1.0
    factor: float = 1.0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The DiffusionGemma text backbone. Field names follow our code, not HF's.

    Sliding layers use ``head_dim``/``num_kv_heads`` and their own ``v_proj``; full layers use
    ``global_head_dim``/``num_global_kv_heads`` and reuse the key projection as value (K = V).
    """

    vocab_size: int = 262_144
    hidden_size: int = 2816
    intermediate_size: int = 2112
    num_heads: int = 16
    head_dim: int = 256
    num_kv_heads: int = 8
    global_head_dim: int = 512
    num_global_kv_heads: int = 2
    layer_types: tuple[str, ...] = tuple((SLIDING,) * 5 + (FULL,)) * 5
    sliding_window: int = 1024
    rope: tuple[tuple[str, RopeConfig], ...] = (
        (SLIDING, RopeConfig("default", 10_000.0)),
        (FULL, RopeConfig("proportional", 1_000_000.0, 0.25)),
    )
    num_experts: int = 128
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 704
    rms_norm_eps: float = 1e-6
    final_logit_softcap: float | None = 30.0
    hidden_activation: str = "gelu_pytorch_tanh"
    canvas_length: int = 256
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_ids: tuple[int, ...] = (1, 106, 50)
    # Back ends (not part of the checkpoint): how MoE and attention are computed.
    moe_impl: str = "auto"
    attention_impl: str = "xla"
    remat: bool = False  # recompute each layer's activations and the training losses' logits in the backward pass

    def __post_init__(self):
        for lt in self.layer_types:
            if lt not in (SLIDING, FULL):
                raise ConfigError(f"layer_types: unknown layer type {lt!r} (expected {SLIDING!r} or {FULL!r})")
        if self.layer_types and self.layer_types[-1] != FULL:
            raise ConfigError("layer_types: the last layer must be 'full_attention'")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(
                f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, num_experts={self.num_experts}]"
            )
        for name, heads in (("num_kv_heads", self.num_kv_heads), ("num_global_kv_heads", self.num_global_kv_heads)):
            if self.num_heads % heads:
                raise ConfigError(f"num_heads={self.num_heads} is not a multiple of {name}={heads}")
        if self.hidden_activation not in _SUPPORTED_ACTIVATIONS:
            raise ConfigError(f"hidden_activation={self.hidden_activation!r} is not supported")
        if self.moe_impl not in MOE_IMPLS:
            raise ConfigError(f"moe_impl={self.moe_impl!r}: expected one of {', '.join(MOE_IMPLS)}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigError(f"attention_impl={self.attention_impl!r}: expected one of {', '.join(ATTENTION_IMPLS)}")
        rope = dict(self.rope)
        for lt in set(self.layer_types):
            if lt not in rope:
                raise ConfigError(f"rope_parameters: no entry for layer type {lt!r}")
            r = rope[lt]
            if r.rope_type not in ("default", "proportional"):
                raise ConfigError(f"rope_parameters[{lt!r}]: rope_type {r.rope_type!r} is not supported")
            if r.rope_type == "default" and r.partial_rotary_factor != 1.0:
                raise ConfigError(f"rope_parameters[{lt!r}]: 'default' RoPE needs partial_rotary_factor 1.0")

    # ---- per-layer views -------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layer_types)

    def layer_head_dim(self, layer_type: str) -> int:
        return self.head_dim if layer_type == SLIDING else self.global_head_dim

    def layer_kv_heads(self, layer_type: str) -> int:
        return self.num_kv_heads if layer_type == SLIDING else self.num_global_kv_heads

    def rope_for(self, layer_type: str) -> RopeConfig:
        return dict(self.rope)[layer_type]

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.hidden_size)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---- HF config.json --------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Builds the config from a ``DiffusionGemmaConfig`` dict (``config.json``)."""
        if cfg.get("model_type") != "diffusion_gemma":
            raise ConfigError(f"{source}: model_type is {cfg.get('model_type')!r}, expected 'diffusion_gemma'")
        tc = cfg.get("text_config")
        if not isinstance(tc, dict):
            raise ConfigError(f"{source}: missing 'text_config'")

        def need(key):
            if tc.get(key) is None:
                raise ConfigError(f"{source}: text_config.{key} is missing")
            return tc[key]

        if tc.get("attention_bias"):
            raise ConfigError(f"{source}: text_config.attention_bias=true is not supported")
        if tc.get("use_bidirectional_attention") == "all":
            raise ConfigError(f"{source}: text_config.use_bidirectional_attention='all' is not supported")
        if cfg.get("tie_word_embeddings") is False or tc.get("tie_word_embeddings") is False:
            raise ConfigError(f"{source}: untied word embeddings are not supported")
        layer_types = tuple(need("layer_types"))
        head_dim, kv_heads = need("head_dim"), need("num_key_value_heads")
        per_layer = {int(k): v for k, v in (tc.get("per_layer_config") or {}).items()}
        dims = {}
        for i, lt in enumerate(layer_types):
            lc = per_layer.get(i, {})
            got = (lc.get("head_dim", head_dim), lc.get("num_key_value_heads", kv_heads))
            if dims.setdefault(lt, got) != got:
                raise ConfigError(f"{source}: layers of type {lt!r} disagree on head_dim / num_key_value_heads")
        sliding = dims.get(SLIDING, (head_dim, kv_heads))
        full = dims.get(FULL, (head_dim, kv_heads))
        rope = []
        for lt, rp in sorted((tc.get("rope_parameters") or {}).items()):
            rope.append(
                (
                    lt,
                    RopeConfig(
                        rp.get("rope_type", "default"),
                        float(rp["rope_theta"]),
                        float(rp.get("partial_rotary_factor", 1.0)),
                        float(rp.get("factor", 1.0)),
                    ),
                )
            )
        eos = tc.get("eos_token_id", 1)
        return cls(
            vocab_size=need("vocab_size"),
            hidden_size=need("hidden_size"),
            intermediate_size=need("intermediate_size"),
            num_heads=need("num_attention_heads"),
            head_dim=sliding[0],
            num_kv_heads=sliding[1],
            global_head_dim=full[0],
            num_global_kv_heads=full[1],
            layer_types=layer_types,
            sliding_window=need("sliding_window"),
            rope=tuple(rope),
            num_experts=need("num_experts"),
            num_experts_per_tok=need("top_k_experts"),
            moe_intermediate_size=need("moe_intermediate_size"),
            rms_norm_eps=float(tc.get("rms_norm_eps", 1e-6)),
            final_logit_softcap=tc.get("final_logit_softcapping", 30.0),
            hidden_activation=tc.get("hidden_activation", "gelu_pytorch_tanh"),
            canvas_length=cfg.get("canvas_length") or 256,
            pad_token_id=tc.get("pad_token_id", 0) if tc.get("pad_token_id") is not None else 0,
            bos_token_id=tc.get("bos_token_id", 2),
            eos_token_ids=tuple(eos) if isinstance(eos, list) else (eos,),
        )

    def to_hf_dict(self, base: dict[str, Any] | None = None) -> dict[str, Any]:
        """Returns a ``config.json`` dict; fields of ``base`` (e.g. the loaded vision config) are kept."""
        out = json.loads(json.dumps(base)) if base else {}
        tc = dict(out.get("text_config") or {})
        tc.update(
            model_type="diffusion_gemma_text",
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            layer_types=list(self.layer_types),
            per_layer_config={
                str(i): {"head_dim": self.global_head_dim, "num_key_value_heads": self.num_global_kv_heads}
                for i, lt in enumerate(self.layer_types)
                if lt == FULL
            },
            sliding_window=self.sliding_window,
            rope_parameters={
                lt: {
                    "rope_type": r.rope_type,
                    "rope_theta": r.theta,
                    **({"partial_rotary_factor": r.partial_rotary_factor} if r.partial_rotary_factor != 1.0 else {}),
                    **({"factor": r.factor} if r.factor != 1.0 else {}),
                }
                for lt, r in self.rope
            },
            num_experts=self.num_experts,
            top_k_experts=self.num_experts_per_tok,
            moe_intermediate_size=self.moe_intermediate_size,
            rms_norm_eps=self.rms_norm_eps,
            final_logit_softcapping=self.final_logit_softcap,
            hidden_activation=self.hidden_activation,
            attention_bias=False,
            tie_word_embeddings=True,
            pad_token_id=self.pad_token_id,
            bos_token_id=self.bos_token_id,
            eos_token_id=list(self.eos_token_ids) if len(self.eos_token_ids) > 1 else self.eos_token_ids[0],
        )
        tc.setdefault("use_bidirectional_attention", None)
        out.update(
            model_type="diffusion_gemma",
            architectures=["DiffusionGemmaForBlockDiffusion"],
            text_config=tc,
            canvas_length=self.canvas_length,
            tie_word_embeddings=True,
        )
        # transformers needs a vision config; a text-only model gets the smallest valid one.
        out.setdefault("vision_config", dict(_PLACEHOLDER_VISION))
        return out


# A tiny Gemma 4 vision tower for configs we write from scratch: we never load or run it, but
# transformers builds one for every DiffusionGemma model.
_PLACEHOLDER_VISION = dict(
    model_type="gemma4_vision",
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=8,
)


def load_hf_config(path: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    """Reads ``config.json`` in a snapshot directory; returns our config and the raw dict."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: not found (expected a Hugging Face snapshot directory)")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file}: not valid JSON ({e})") from e
    return ModelConfig.from_hf_dict(raw, source=str(file)), raw
