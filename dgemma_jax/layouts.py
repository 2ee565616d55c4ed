"""Weights in the memory layouts XLA picks for the denoising loop (what serving on TPU needs).

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


def lower_loop(graphdef, state, cache: KVCache, rows: CanvasRows, *, filters: tuple[int, float] = (0, 1.0),
               weight_layouts: str = "default") -> jax.stages.Lowered:
    """Lowers ``generate``'s per-canvas program (denoising loop + commit) for these arguments
    (arrays, or ``jax.ShapeDtypeStruct`` s with shardings). ``weight_layouts``: ``"default"`` (the
    weights' layouts as they are) or ``"xla"`` (XLA picks them: ``compiled.input_formats``)."""
    if weight_layouts not in WEIGHT_LAYOUTS:
        raise ValueError(f"weight_layouts must be one of {WEIGHT_LAYOUTS}, got {weight_layouts!r}")
    loop = functools.partial(denoise_and_commit, graphdef, filters=filters, with_hook=False)
    options = {}
    if weight_layouts == "xla":  # the other arguments keep their own sharding and layout (None)
        options["in_shardings"] = (jax.tree.map(lambda x: Format(Layout.AUTO, _sharding(x)), state), None, None, None)
    return jax.jit(loop, donate_argnums=1, **options).lower(state, cache, rows, np.int32(0))


def loop_weight_formats(graphdef, state, cache: KVCache, rows: CanvasRows, *,
                        filters: tuple[int, float] = (0, 1.0)):
    """The formats (layout + sharding) XLA chooses for the weights in the denoising loop of these
    argument shapes: a pytree like ``state``. Compiles the loop once."""
    compiled = lower_loop(graphdef, state, cache, rows, filters=filters, weight_layouts="xla").compile()
    return compiled.input_formats[0][0]


def place_weights(model: Model, formats) -> Model:
    """Moves ``model``'s weights into ``formats`` (from :func:`loop_weight_formats`), in place, one
    leaf at a time; returns ``model``. Leaves already in their format are not copied."""
    leaves, treedef = jax.tree.flatten(model.state)
    targets = treedef.flatten_up_to(formats)
    # donate: each old buffer is freed as soon as its copy exists
    placed = [leaf if leaf.format == target else jax.device_put(leaf, target, donate=True)
              for leaf, target in zip(leaves, targets, strict=True)]
    nnx.update(model.module, jax.tree.unflatten(treedef, placed))
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
