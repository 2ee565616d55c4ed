"""The oracle: random tiny transformers DiffusionGemma models that the tests build and save."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

# One intra-op thread: on these tiny tensors torch's 2-thread OpenMP pool spends ~15 ms per op
# in synchronisation on this 2-core machine (0.004 ms with one thread). Results are identical.
torch.set_num_threads(1)

TINY_VISION = dict(
    model_type="gemma4_vision", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    num_attention_heads=2, num_key_value_heads=2, head_dim=8,
)


def text_config(**overrides) -> dict:
    """A small text config; ``overrides`` use transformers' field names."""
    cfg = dict(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, global_head_dim=16, num_global_key_value_heads=1,
        sliding_window=8, num_experts=4, top_k_experts=2, moe_intermediate_size=12,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    )
    cfg.update(overrides)
    cfg["num_hidden_layers"] = len(cfg["layer_types"])
    return cfg


def build(seed: int = 0, canvas_length: int = 8, **overrides) -> DiffusionGemmaForBlockDiffusion:
    """A float32 model with every weight, norm scale and ``layer_scalar`` randomised.

    Norm scales and layer scalars are drawn away from their init (1.0) so that a mix-up between
    any two of them, or between the encoder and decoder copies, changes the logits.
    """
    torch.manual_seed(seed)
    cfg = DiffusionGemmaConfig(text_config=text_config(**overrides), vision_config=dict(TINY_VISION),
                               canvas_length=canvas_length)
    # The readable per-expert loop; the default grouped-mm kernel rejects odd sizes on CPU.
    cfg._experts_implementation = "eager"
    model = DiffusionGemmaForBlockDiffusion(cfg).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vision" in name:
                continue
            if name.endswith("norm.weight") or name.endswith("router.scale") or "per_expert_scale" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))
        text_layers = model.config.text_config.num_hidden_layers
        for i in range(text_layers):
            scalar = 0.5 + torch.rand(1, generator=gen)
            model.model.decoder.layers[i].layer_scalar.copy_(scalar)
            model.model.encoder.language_model.layers[i].layer_scalar.copy_(scalar)
    return model


def save(model: DiffusionGemmaForBlockDiffusion, path: Path, **kwargs) -> Path:
    model.save_pretrained(str(path), **kwargs)
    return Path(path)


@torch.no_grad()
def canvas_logits(model, prompt: np.ndarray, canvas: np.ndarray, sc: np.ndarray | None = None) -> np.ndarray:
    out = model(
        input_ids=torch.from_numpy(np.asarray(prompt, np.int64)),
        decoder_input_ids=torch.from_numpy(np.asarray(canvas, np.int64)),
        self_conditioning_logits=None if sc is None else torch.from_numpy(np.asarray(sc, np.float32)),
    )
    return out.logits.numpy()


@torch.no_grad()
def encoder_logits(model, prompt: np.ndarray) -> np.ndarray:
    """The encoder's autoregressive logits: tied LM head + soft-cap over the encoder's final states."""
    ids = torch.from_numpy(np.asarray(prompt, np.int64))
    canvas = torch.zeros((ids.shape[0], 1), dtype=torch.long)
    hidden = model.model(input_ids=ids, decoder_input_ids=canvas).encoder_last_hidden_state
    logits = model.lm_head(hidden).float()
    cap = model.final_logit_softcapping
    return (torch.tanh(logits / cap) * cap).numpy()


def load(path: Path) -> tuple[DiffusionGemmaForBlockDiffusion, dict]:
    """transformers' own loader, with the same expert implementation as ``build``."""
    model, info = DiffusionGemmaForBlockDiffusion.from_pretrained(
        str(path), output_loading_info=True, experts_implementation="eager"
    )
    return model.eval(), info
