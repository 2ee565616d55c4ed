"""The training loop: model + data + optimizer + checkpoints, driven by one ml_collections config.

See ``configs/train/*.py`` for the fields and ``docs/training.md`` for a walk-through. One
optimizer update per step; ``optim.grad_accum`` micro-batches are scanned inside the jitted step.
Weights keep ``model.dtype`` (bf16 for large models), the optimizer state is float32. Steps are
deterministic given the config: step ``s`` draws its noise from ``fold_in(seed, s)`` and the data
order is grain's, whose iterator state is checkpointed with the weights, so ``resume=True`` after a
kill reproduces the uninterrupted loss curve from the last checkpoint on.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from dgemma_jax.api import Model, from_config, from_pretrained
from dgemma_jax.chat import ChatTemplate
from dgemma_jax.configs_io import load_model_config
from dgemma_jax.layouts import WEIGHT_LAYOUTS, lower_train_step, place, resolve_weight_layouts
from dgemma_jax.moe import resolve_impl
from dgemma_jax.sharding import RULES, logical_to_spec, make_mesh
from dgemma_jax.tokenizer import Tokenizer
from dgemma_jax.training import data as data_lib
from dgemma_jax.training import lora as lora_lib
from dgemma_jax.training.objective import ObjectiveConfig, draw_noise, losses, response_of

METRICS = ("loss", "diffusion", "ar", "grad_norm")
CSV_FIELDS = ("step", *METRICS, "lr", "tokens", "tokens_per_s", "elapsed_s")


class TrainError(ValueError):
    """A training config or run directory that cannot be used; the message names the field or path."""


def build_optimizer(optim: ml_collections.ConfigDict, steps: int) -> tuple[optax.GradientTransformation, Callable]:
    """AdamW with linear warmup then cosine decay to ``end_lr``, after global-norm clipping."""
    if optim.warmup_steps >= steps:
        raise TrainError(f"optim.warmup_steps={optim.warmup_steps} must be < run.steps={steps}")
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=optim.lr, warmup_steps=optim.warmup_steps, decay_steps=steps,
        end_value=optim.end_lr,
    )
    tx = optax.chain(
        optax.clip_by_global_norm(optim.clip_norm),
        optax.adamw(schedule, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay),
    )
    return tx, schedule


def training_moe_impl(name: str, platform: str | None = None) -> str:
    """The MoE back end to train with: ``auto`` is ``dense`` on CPU (XLA:CPU runs ``ragged_dot`` and its
    gradient as masked dense products, 2.3x slower than the plain dense one in bench/train.py) and
    what inference picks elsewhere (``pallas`` on TPU, ``bucketed`` on GPU). ``tiled`` and ``pallas_gpu``
    have no gradient."""
    if name in ("tiled", "pallas_gpu"):
        raise TrainError(f"model.moe_impl={name!r} has no gradient; use 'auto', 'ragged', 'pallas', 'bucketed' or "
                         "'dense'")
    if name == "auto":
        platform = platform or jax.default_backend()
        return "dense" if platform == "cpu" else resolve_impl(name, platform)
    return name


def training_attention_impl(name: str) -> str:
    """The attention back end to train with: the model's, unless it has no gradient (``pallas_gpu``)."""
    if name == "pallas_gpu":
        raise TrainError(f"model attention_impl={name!r} has no gradient; use 'xla' or 'pallas'")
    return name


def _f32(tree):
    return jax.tree.map(lambda x: x.astype(jnp.float32), tree)


def make_train_step(graphdef, rest, tx, objective: ObjectiveConfig, lora_cfg: lora_lib.LoraConfig | None,
                    grad_accum: int, vocab_size: int):
    """The pure train step ``(trainable, opt_state, frozen, batch, key) -> (trainable, opt_state, metrics)``.

    ``trainable``: the model's parameters (full fine-tuning; ``frozen`` is None) or the LoRA
    adapters (``frozen`` = the base parameters). ``batch`` arrays are [grad_accum * micro, ...].
    """

    def loss_fn(trainable, frozen, micro, key):
        params = trainable if lora_cfg is None else lora_lib.adapt(frozen, trainable, lora_cfg)
        module = nnx.merge(graphdef, params, rest)
        n = micro["loss_mask"].shape[1]
        response = response_of(micro["tokens"], micro["prompt_len"], n)
        noise = draw_noise(key, response, micro["loss_mask"], vocab_size, objective)
        out = losses(module, micro["tokens"], micro["prompt_len"], micro["loss_mask"], noise, objective)
        return out["loss"], out

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(trainable, opt_state, frozen, batch, key):
        micro = jax.tree.map(lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch)
        keys = jax.random.split(key, grad_accum)

        def one(acc, xs):
            (_, out), grads = grad_fn(trainable, frozen, *xs)
            return jax.tree.map(jnp.add, acc, _f32(grads)), out

        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), trainable)
        grads, outs = jax.lax.scan(one, zeros, (micro, keys))
        grads = jax.tree.map(lambda g: g / grad_accum, grads)
        master = _f32(trainable)
        updates, opt_state = tx.update(grads, opt_state, master)
        trainable = jax.tree.map(lambda p, m, u: (m + u).astype(p.dtype), trainable, master, updates)
        metrics = {k: jnp.mean(v) for k, v in outs.items()}
        metrics["grad_norm"] = optax.tree.norm(grads)
        return trainable, opt_state, metrics

    return step


def _mesh(spec) -> jax.sharding.Mesh:
    """``{"data": -1}`` -> a mesh; one axis may be -1 (the remaining devices)."""
    shape = dict(spec)
    n = len(jax.devices())
    free = [k for k, v in shape.items() if v == -1]
    if len(free) > 1:
        raise TrainError(f"run.mesh={shape}: at most one axis may be -1")
    fixed = int(np.prod([v for v in shape.values() if v != -1]))
    if free:
        if n % fixed:
            raise TrainError(f"run.mesh={shape}: {n} devices are not divisible by {fixed}")
        shape[free[0]] = n // fixed
    return make_mesh(shape)


class Trainer:
    """Builds everything a run needs from ``cfg`` (see ``configs/train/sudoku_scratch.py``)."""

    def __init__(self, cfg: ml_collections.ConfigDict):
        self.cfg = cfg
        self.out_dir = Path(cfg.run.out_dir)
        self.mesh = _mesh(cfg.run.mesh)
        self.model = self._load_model()
        self.config = self.model.config
        assets = Path(cfg.model.assets or cfg.model.init)
        self.tokenizer = Tokenizer.load(assets)
        template = ChatTemplate.load(assets) if (assets / "chat_template.jinja").is_file() else None
        if self.tokenizer.vocab_size > self.config.vocab_size:
            raise TrainError(f"{assets}: tokenizer has {self.tokenizer.vocab_size} tokens, more than the model's "
                             f"vocab_size={self.config.vocab_size}")
        d = cfg.data
        self.data_cfg = data_lib.DataConfig(
            path=d.path, max_prompt_len=d.max_prompt_len, num_canvases=d.num_canvases, overlong=d.overlong,
            skip_malformed=d.skip_malformed, supervise_padding=d.supervise_padding,
        )
        rows, self.data_stats = data_lib.load_rows(self.data_cfg, self.tokenizer, template, self.config.canvas_length,
                                                   self.config.pad_token_id, self.tokenizer.eos_id)
        accum = cfg.optim.grad_accum
        if d.batch_size % (accum * jax.process_count()):
            raise TrainError(f"data.batch_size={d.batch_size} must be a multiple of optim.grad_accum={accum} "
                             f"times the process count {jax.process_count()}")
        self.dataset = data_lib.pipeline(rows, d.batch_size // jax.process_count(), d.seed, jax.process_index(),
                                         jax.process_count())
        self.objective = ObjectiveConfig(t_min=cfg.objective.t_min, ar_weight=cfg.objective.ar_weight,
                                         p_self_cond=cfg.objective.p_self_cond)
        self.lora_cfg = (lora_lib.LoraConfig(cfg.lora.rank, cfg.lora.alpha, tuple(cfg.lora.targets))
                         if cfg.lora.enabled else None)
        self.tx, self.schedule = build_optimizer(cfg.optim, cfg.run.steps)
        graphdef, params, rest = nnx.split(self.model.module, nnx.Param, ...)
        self.graphdef, self.rest = graphdef, rest
        replicated = NamedSharding(self.mesh, PartitionSpec())
        if self.lora_cfg is None:
            self.trainable, self.frozen = params, None
        else:
            adapters = lora_lib.init(params, self.lora_cfg, seed=cfg.run.seed)
            self.trainable, self.frozen = jax.device_put(adapters, replicated), params
        # moments follow the parameters' shardings; the step counters are replicated on the mesh
        self.opt_state = jax.tree.map(lambda x: x if len(x.sharding.device_set) > 1 else jax.device_put(x, replicated),
                                      jax.jit(self.tx.init)(_f32(self.trainable)))
        self._step = make_train_step(graphdef, rest, self.tx, self.objective, self.lora_cfg, accum,
                                     self.config.vocab_size)
        self.train_step = None  # compiled for the first batch (``_compile_step``)
        self.weight_layouts = _weight_layouts(cfg.run.get("weight_layouts", "auto"), self.mesh, self.frozen)
        self.batch_sharding = NamedSharding(self.mesh, logical_to_spec(("batch",), (d.batch_size,), self.mesh, RULES))
        self.assets = assets

    # ---- setup -------------------------------------------------------------------------------
    def _load_model(self) -> Model:
        m = self.cfg.model
        overrides = dict(moe_impl=training_moe_impl(m.moe_impl), remat=m.remat)
        if m.init:
            return from_pretrained(m.init, dtype=m.dtype, mesh=self.mesh, progress=True, **overrides)
        if not m.config:
            raise TrainError("model.init (a checkpoint to fine-tune) or model.config (a configs/model/*.py to "
                             "train from scratch) must be set")
        if not m.assets:
            raise TrainError("model.assets (tokenizer / generation config directory) must be set with model.config")
        config = load_model_config(m.config)
        config = config.replace(attention_impl=training_attention_impl(config.attention_impl), **overrides)
        scratch = from_config(config, seed=self.cfg.run.seed, dtype=m.dtype, mesh=self.mesh)
        return Model(scratch.module, source_dir=Path(m.assets), mesh=self.mesh)

    # ---- checkpoints ---------------------------------------------------------------------------
    def _manager(self) -> ocp.CheckpointManager:
        r = self.cfg.run
        options = ocp.CheckpointManagerOptions(max_to_keep=r.keep, enable_async_checkpointing=r.async_checkpoints,
                                               create=True)
        return ocp.CheckpointManager((self.out_dir / "checkpoints").absolute(), options=options)

    def _state_leaves(self) -> dict[str, jax.Array]:
        leaves = jax.tree.leaves((self.trainable, self.opt_state))
        return {f"{i:05d}": x for i, x in enumerate(leaves)}

    def _save(self, manager: ocp.CheckpointManager, step: int, data_state: dict) -> None:
        manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(self._state_leaves()),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(dict(step=step, config=self.cfg.to_dict())),
        ))

    def _restore(self, manager: ocp.CheckpointManager, step: int) -> dict:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                self._state_leaves())
        got = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        treedef = jax.tree.structure((self.trainable, self.opt_state))
        self.trainable, self.opt_state = jax.tree.unflatten(treedef, [got.state[k] for k in sorted(got.state)])
        return got.data

    def restore_latest(self) -> int:
        """Loads the latest checkpoint of ``run.out_dir`` (weights / adapters and optimizer state);
        returns its step. FileNotFoundError when there is none."""
        manager = self._manager()
        try:
            latest = manager.latest_step()
            if latest is None:
                raise FileNotFoundError(f"{self.out_dir / 'checkpoints'}: no checkpoint to restore")
            self._restore(manager, latest)
        finally:
            manager.close()
        return latest

    # ---- the loop ------------------------------------------------------------------------------
    def run(self, resume: bool = False, on_step: Callable[[int, dict], None] | None = None,
            progress: bool = True) -> list[dict[str, Any]]:
        """Trains to ``run.steps``; returns the metrics rows of the steps run here.

        ``resume``: continue from the latest checkpoint in ``run.out_dir``. Without it, a run
        directory that already holds checkpoints is refused. ``on_step(step, metrics)`` is called
        after each step (metrics as Python floats)."""
        r = self.cfg.run
        manager = self._manager()
        iterator = iter(self.dataset)
        start = 0
        latest = manager.latest_step()
        if latest is not None and not resume:
            raise TrainError(f"{self.out_dir}: holds checkpoints (latest step {latest}); pass resume "
                             f"(--resume) to continue it, or choose another run.out_dir")
        if resume and latest is not None:
            iterator.set_state(self._restore(manager, latest))
            start = latest
        metrics_file = self.out_dir / "metrics.csv"
        _truncate_metrics(metrics_file, start)
        base_key = jax.random.key(r.seed)
        rows: list[dict[str, Any]] = []
        t0 = time.perf_counter()
        bar = tqdm(total=r.steps, initial=start, desc="train", unit="step", disable=not progress, dynamic_ncols=True)
        try:
            with open(metrics_file, "a", newline="") as mf:
                writer = csv.DictWriter(mf, CSV_FIELDS)
                if mf.tell() == 0:
                    writer.writeheader()
                for step in range(start + 1, r.steps + 1):
                    batch = next(iterator)
                    tokens = int(np.sum(batch["prompt_len"]) + np.sum(batch["loss_mask"]))
                    batch = {k: jax.make_array_from_process_local_data(self.batch_sharding, v)
                             for k, v in batch.items()}  # this process's rows of the global batch
                    key = jax.random.fold_in(base_key, step)
                    if self.train_step is None:
                        bar.set_description("train (compiling the step)")
                        self._compile_step(batch, key)
                        bar.set_description("train")
                    t_step = time.perf_counter()
                    self.trainable, self.opt_state, m = self.train_step(
                        self.trainable, self.opt_state, self.frozen, batch, key)
                    m = {k: float(v) for k, v in m.items()}
                    dt = time.perf_counter() - t_step
                    row = dict(step=step, **m, lr=float(self.schedule(step - 1)), tokens=tokens,
                               tokens_per_s=tokens / dt, elapsed_s=time.perf_counter() - t0)
                    rows.append(row)
                    writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
                    if step % r.log_every == 0 or step == r.steps:
                        mf.flush()
                    bar.update(1)
                    bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{tokens / dt:,.0f}")
                    if step % r.save_every == 0 or step == r.steps:
                        self._save(manager, step, iterator.get_state())
                    if on_step is not None:
                        on_step(step, row)
        finally:
            bar.close()
            manager.wait_until_finished()
            manager.close()
        return rows

    def _compile_step(self, batch, key) -> None:
        """Compiles the step once for the run's batches (``layouts.lower_train_step``). With
        ``run.weight_layouts="xla"`` the frozen base weights' layouts are left to XLA, and the weights
        are moved into them (``layouts.place``: one tensor at a time)."""
        self.train_step = lower_train_step(self._step, self.trainable, self.opt_state, self.frozen, batch, key,
                                           weight_layouts=self.weight_layouts).compile()
        if self.weight_layouts == "xla":
            self.frozen = place(self.frozen, self.train_step.input_formats[0][2])
            nnx.update(self.model.module, self.frozen)  # its old buffers were donated

    # ---- export --------------------------------------------------------------------------------
    def merged_params(self) -> nnx.State:
        return self.trainable if self.lora_cfg is None else lora_lib.merge(self.frozen, self.trainable, self.lora_cfg)

    def export(self, out_dir: str | Path | None = None) -> Path:
        """Writes the trained model as an HF snapshot (LoRA merged in; tokenizer, chat template and
        generation config copied from ``model.assets``); with LoRA also the adapter alone."""
        out_dir = Path(out_dir or self.out_dir / "export")
        module = nnx.merge(self.graphdef, self.merged_params(), self.rest)
        Model(module, hf_config=self.model.hf_config, source_dir=self.assets,
              passthrough=self.model._passthrough).save_pretrained(out_dir)  # vision tower kept as loaded
        if self.lora_cfg is not None:
            lora_lib.save(jax.device_get(self.trainable), self.lora_cfg, self.out_dir / "adapter")
        return out_dir


def _weight_layouts(name: str, mesh: jax.sharding.Mesh, frozen) -> str:
    """``run.weight_layouts`` -> "xla" or "default": ``auto`` is "xla" for LoRA on TPU (the frozen
    weights in the layouts XLA picks for the step: ``layouts.lower_train_step``), else "default"."""
    if name not in ("auto", *WEIGHT_LAYOUTS):
        raise TrainError(f"run.weight_layouts={name!r}: expected 'auto', 'xla' or 'default'")
    if frozen is None:  # full fine-tuning: every weight is trained, none is frozen to place
        if name == "xla":
            raise TrainError("run.weight_layouts='xla' places LoRA's frozen base weights; with lora.enabled=False "
                             "every weight is trained (use 'auto' or 'default')")
        return "default"
    return resolve_weight_layouts(name, mesh.devices.flat[0].platform)


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Keeps the rows of steps <= ``last_step`` (a resumed run rewrites what it will redo)."""
    if not path.is_file():
        return
    with open(path, newline="") as f:
        rows = [row for row in csv.DictReader(f) if int(row["step"]) <= last_step]
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
