"""Weights in the memory layouts XLA picks for the denoising loop (what serving on TPU needs) and
for the LoRA train step.

On TPU, XLA wants the attention and expert weights tiled differently from the default layout the
parameters arrive in. A single forward pass converts each layer's weights just before use (a small
transient copy), but a ``while`` loop's operands need one layout, so the compiled denoising loop
converts every weight before the loop and holds both copies: for the 26B model on v5e:2x4 that is
17.7 GB of temporaries, more than a chip has (``docs/scaling.md``).

:func:`loop_weight_formats` compiles the loop with the weights' layouts left to XLA
(``Layout.AUTO``) and returns the formats it chose; :func:`place_weights` moves a model's weights
into them once, leaf by leaf (each old buffer is freed as its copy lands, so the peak is one leaf
over the weights); :func:`place_for_loop` does both for a batch and context (``dgemma serve``
does it on TPU by itself). Later jitted calls take committed arguments in the layout they have, so the loop
then runs on the weights as placed, with no copy. On CPU XLA picks the default layouts and placing
changes nothing.

The LoRA train step has the same problem with its frozen base weights: :func:`lower_train_step`
compiles it with their layouts left to XLA, and ``Trainer`` places them (:func:`place`) and runs
that compiled step (``run.weight_layouts``; on TPU by default).
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from flax import nnx
from jax.experimental.layout import Format, Layout

from dgemma_jax.api import Model
from dgemma_jax.cache import KVCache
from dgemma_jax.generation import CanvasRows, denoise_and_commit

WEIGHT_LAYOUTS = ("default", "xla")


def resolve_weight_layouts(name: str, platform: str) -> str:
    """A ``weight_layouts`` setting (``"auto"`` or one of ``WEIGHT_LAYOUTS``) -> the one to use on
    ``platform``: ``"auto"`` is ``"xla"`` on TPU (where XLA wants other layouts), else ``"default"``."""
    if name not in ("auto", *WEIGHT_LAYOUTS):
        raise ValueError(f"weight_layouts must be one of {('auto', *WEIGHT_LAYOUTS)}, got {name!r}")
    return ("xla" if platform == "tpu" else "default") if name == "auto" else name


def _auto_formats(weights, weight_layouts: str):
    """``Format(Layout.AUTO)`` for each weight (keeping its sharding) with ``weight_layouts="xla"``,
    None (the layouts as they are) with ``"default"``."""
    if weight_layouts not in WEIGHT_LAYOUTS:
        raise ValueError(f"weight_layouts must be one of {WEIGHT_LAYOUTS}, got {weight_layouts!r}")
    return jax.tree.map(lambda x: Format(Layout.AUTO, _sharding(x)), weights) if weight_layouts == "xla" else None


def lower_loop(graphdef, state, cache: KVCache, rows: CanvasRows, *, filters: tuple[int, float] = (0, 1.0),
               weight_layouts: str = "default") -> jax.stages.Lowered:
    """Lowers ``generate``'s per-canvas program (denoising loop + commit) for these arguments
    (arrays, or ``jax.ShapeDtypeStruct`` s with shardings). ``weight_layouts``: ``"default"`` (the
    weights' layouts as they are) or ``"xla"`` (XLA picks them: ``compiled.input_formats``)."""
    loop = functools.partial(denoise_and_commit, graphdef, filters=filters, with_hook=False)
    options = {}
    formats = _auto_formats(state, weight_layouts)
    if formats is not None:  # the other arguments keep their own sharding and layout (None)
        options["in_shardings"] = (formats, None, None, None)
    return jax.jit(loop, donate_argnums=1, **options).lower(state, cache, rows, np.int32(0))


def loop_weight_formats(graphdef, state, cache: KVCache, rows: CanvasRows, *,
                        filters: tuple[int, float] = (0, 1.0)):
    """The formats (layout + sharding) XLA chooses for the weights in the denoising loop of these
    argument shapes: a pytree like ``state``. Compiles the loop once."""
    compiled = lower_loop(graphdef, state, cache, rows, filters=filters, weight_layouts="xla").compile()
    return compiled.input_formats[0][0]


def lower_train_step(step, trainable, opt_state, frozen, *args,
                     weight_layouts: str = "default") -> jax.stages.Lowered:
    """Lowers the train step ``step(trainable, opt_state, frozen, *args)``
    (``training.trainer.make_train_step``'s, with ``batch, key`` and possibly more after ``frozen``)
    as ``Trainer`` runs it: the trainable weights and the optimizer state donated and returned in
    the shardings they came in (so that one compiled step serves every step).
    ``weight_layouts="xla"``: the frozen base weights' (LoRA) layouts are left to XLA
    (``compiled.input_formats[0][2]``). With the defaults, on TPU, XLA copies the 26B experts into
    the layout their kernel reads at every use and keeps the copies alive across the step's passes
    (36 copies of 66 MB for one layer at 4,096 tokens: ``docs/scaling.md``)."""
    options = dict(out_shardings=(jax.tree.map(_sharding, trainable), jax.tree.map(_sharding, opt_state), None))
    formats = _auto_formats(frozen, weight_layouts)
    if formats is not None:
        options["in_shardings"] = (None, None, formats) + (None,) * len(args)
        frozen = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=_sharding(x)), frozen)
    return jax.jit(step, donate_argnums=(0, 1), **options).lower(trainable, opt_state, frozen, *args)


def place(tree, formats):
    """Moves each leaf of ``tree`` (arrays) into its format in ``formats`` (a pytree like it, e.g.
    ``compiled.input_formats``), one leaf at a time, each old buffer donated: freed as soon as its
    copy exists, so the peak is one leaf over the tree. Returns the new tree; leaves already in
    their format are kept, not copied."""
    leaves, treedef = jax.tree.flatten(tree)
    targets = treedef.flatten_up_to(formats)
    placed = [leaf if leaf.format == target else jax.device_put(leaf, target, donate=True)
              for leaf, target in zip(leaves, targets, strict=True)]
    return jax.tree.unflatten(treedef, placed)


def place_weights(model: Model, formats) -> Model:
    """Moves ``model``'s weights into ``formats`` (from :func:`loop_weight_formats`), in place
    (:func:`place`); returns ``model``."""
    nnx.update(model.module, place(model.state, formats))
    model.graphdef, model.state = nnx.split(model.module)
    return model


def place_for_loop(model: Model, batch: int, context: int, *, filters: tuple[int, float] = (0, 1.0)) -> Model:
    """Places ``model``'s weights in the layouts of the denoising loop for ``batch`` rows and a cache
    of ``context`` positions (the layouts hardly depend on either); returns ``model``. Compiles the
    loop once. Do this before ``generate`` on TPU when the loop would not fit otherwise."""
    from dgemma_jax.plan import loop_inputs
    from dgemma_jax.sharding import make_mesh

    weights = jax.tree.leaves(model.state)
    mesh = model.mesh if model.mesh is not None else make_mesh({"data": 1}, list(weights[0].devices()))
    cache, rows = loop_inputs(model.config, batch, context, model.dtype, mesh)
    return place_weights(model, loop_weight_formats(model.graphdef, model.state, cache, rows, filters=filters))


def _sharding(x):
    sharding = getattr(x, "sharding", None)
    if sharding is None:
        raise ValueError("weights need a sharding (arrays, or ShapeDtypeStructs with sharding=)")
    return sharding
