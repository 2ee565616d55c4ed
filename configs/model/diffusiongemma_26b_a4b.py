"""DiffusionGemma 26B-A4B text backbone (google/diffusiongemma-26B-A4B-it), per SPEC §3.

A checkpoint's own config.json is authoritative; this file is for sizing, sharding plans and
compile-only runs without the weights.
"""

import ml_collections

SLIDING, FULL = "sliding_attention", "full_attention"


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            vocab_size=262_144,
            hidden_size=2816,
            intermediate_size=2112,
            num_heads=16,
            head_dim=256,  # sliding layers
            num_kv_heads=8,
            global_head_dim=512,  # full layers (K = V, no v_proj)
            num_global_kv_heads=2,
            layer_types=([SLIDING] * 5 + [FULL]) * 5,  # 30 layers, last one full
            sliding_window=1024,
            rope={
                SLIDING: dict(rope_type="default", theta=10_000.0, partial_rotary_factor=1.0, factor=1.0),
                FULL: dict(rope_type="proportional", theta=1_000_000.0, partial_rotary_factor=0.25, factor=1.0),
            },
            num_experts=128,
            num_experts_per_tok=8,
            moe_intermediate_size=704,
            rms_norm_eps=1e-6,
            final_logit_softcap=30.0,
            hidden_activation="gelu_pytorch_tanh",
            canvas_length=256,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_ids=[1, 106, 50],
            moe_impl="auto",
            attention_impl="xla",
        )
    )
