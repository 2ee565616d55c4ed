"""LoRA SFT of DiffusionGemma 26B-A4B, mirroring the published recipe (SPEC §5): AdamW lr 1.5e-4,
betas (0.95, 0.99), weight decay 1e-4, warmup then cosine to 1.5e-5, clip 1.0, rank 16 on attention
and the dense MLP (add "moe" to ``lora.targets`` to adapt every expert too).

    dgemma train --config configs/train/lora_26b_sft.py \\
        --config.model.init=/path/to/diffusiongemma-26B-A4B-it --config.data.path=sft.jsonl

bf16 weights with float32 optimizer state; the base weights are sharded by ``run.mesh`` with the
model's fsdp/expert rules (e.g. ``--config.run.mesh="{'data': 1, 'fsdp': 4, 'expert': 2}"``).
On a TPU v5e:2x4 (16 GB per chip), ``run.mesh={'expert': 8}`` with one row of 2,048 tokens per
micro-batch (``data.batch_size`` = ``optim.grad_accum``) compiles to 14.10 GB per chip
(``dgemma plan --topology v5e:2x4 --mesh expert=8 --batch 1 --context 2048 --programs train``;
docs/scaling.md), and to 15.77 GB with rows of 4,096 (``--context 4096``).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            model=dict(init="", config="", assets="", dtype="bfloat16", moe_impl="auto", remat=True),
            data=dict(path="", max_prompt_len=1024, num_canvases=4, overlong="truncate", skip_malformed=True,
                      supervise_padding=True, batch_size=16, seed=0),
            objective=dict(t_min=1e-3, ar_weight=1.0, p_self_cond=0.5),
            optim=dict(lr=1.5e-4, end_lr=1.5e-5, warmup_steps=100, b1=0.95, b2=0.99, weight_decay=1e-4,
                       clip_norm=1.0, grad_accum=4),
            lora=dict(enabled=True, rank=16, alpha=32.0, targets=("attn", "mlp")),
            run=dict(out_dir="runs/lora_26b", steps=2000, save_every=200, keep=3, async_checkpoints=True,
                     log_every=10, seed=0, mesh={"data": 1, "fsdp": -1}, weight_layouts="auto"),
        )
    )
