"""A small model with the 26B's structure (5 sliding : 1 full, K = V full layers, proportional RoPE,
MoE top-k) for benchmarks and multi-device tests: runs in seconds on CPU."""

import ml_collections

SLIDING, FULL = "sliding_attention", "full_attention"


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            vocab_size=4096,
            hidden_size=256,
            intermediate_size=512,
            num_heads=4,
            head_dim=64,
            num_kv_heads=2,
            global_head_dim=128,
            num_global_kv_heads=1,
            layer_types=[SLIDING] * 5 + [FULL],
            sliding_window=128,
            rope={
                SLIDING: dict(rope_type="default", theta=10_000.0, partial_rotary_factor=1.0, factor=1.0),
                FULL: dict(rope_type="proportional", theta=1_000_000.0, partial_rotary_factor=0.25, factor=1.0),
            },
            num_experts=16,
            num_experts_per_tok=4,
            moe_intermediate_size=128,
            rms_norm_eps=1e-6,
            final_logit_softcap=30.0,
            hidden_activation="gelu_pytorch_tanh",
            canvas_length=64,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_ids=[1, 106, 50],
            moe_impl="auto",
            attention_impl="xla",
        )
    )
