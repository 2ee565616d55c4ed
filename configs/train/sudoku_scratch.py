"""Train the Sudoku model from scratch (``python train/sudoku.py`` runs data, training, export, eval).

    dgemma train --config configs/train/sudoku_scratch.py --config.run.out_dir=runs/sudoku

``model.assets`` / ``data.path`` are what ``train/sudoku.py prepare`` writes.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            model=dict(
                init="",  # no checkpoint: train from scratch ...
                config="configs/model/sudoku.py",  # ... with this architecture
                assets="runs/sudoku/assets",  # tokenizer.model, chat template, generation_config.json
                dtype="float32",
                moe_impl="auto",  # training back end: dense on CPU, bucketed on GPU, pallas on TPU
                remat=False,
            ),
            data=dict(
                path="runs/sudoku/train.jsonl",
                max_prompt_len=82,  # BOS + 81 cell tokens
                num_canvases=1,  # 81 digits + EOS = one canvas of 82
                overlong="drop",
                skip_malformed=False,
                supervise_padding=True,
                batch_size=32,
                seed=0,
            ),
            # No AR loss here: left-to-right Sudoku is not what the sampler does, and without it the
            # encoder pass skips the canvas (a third less compute per step on CPU).
            objective=dict(t_min=1e-3, ar_weight=0.0, p_self_cond=0.5),
            optim=dict(lr=2e-3, end_lr=1e-4, warmup_steps=100, b1=0.9, b2=0.99, weight_decay=1e-4, clip_norm=1.0,
                       grad_accum=1),
            lora=dict(enabled=False, rank=16, alpha=32.0, targets=("attn", "mlp")),
            run=dict(out_dir="runs/sudoku/train", steps=2000, save_every=200, keep=3, async_checkpoints=True,
                     log_every=10, seed=0, mesh={"data": -1}),
        )
    )
