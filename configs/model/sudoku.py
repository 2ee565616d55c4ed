"""The Sudoku model: a small DiffusionGemma (MoE, 5:1-style sliding/full layers) trained from scratch.

Vocabulary 1280: the Gemma 4 specials at their ids, the 810 cell tokens and 9 digits of
``dgemma_jax.sudoku``, bytes and a few hundred text pieces. One canvas holds 81 digits + EOS.
The sliding window spans the whole prompt + canvas (164 tokens).
"""

import ml_collections

SLIDING, FULL = "sliding_attention", "full_attention"


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            vocab_size=1280,
            hidden_size=128,
            intermediate_size=256,
            num_heads=4,
            head_dim=32,
            num_kv_heads=2,
            global_head_dim=64,
            num_global_kv_heads=1,
            layer_types=[SLIDING, SLIDING, FULL, SLIDING, SLIDING, FULL],
            sliding_window=256,
            rope={
                SLIDING: dict(rope_type="default", theta=10_000.0, partial_rotary_factor=1.0, factor=1.0),
                FULL: dict(rope_type="proportional", theta=1_000_000.0, partial_rotary_factor=0.25, factor=1.0),
            },
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=64,
            rms_norm_eps=1e-6,
            final_logit_softcap=30.0,
            hidden_activation="gelu_pytorch_tanh",
            canvas_length=82,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_ids=[1, 106, 50],
            moe_impl="auto",
            attention_impl="xla",
        )
    )
