"""Weights placed in the layouts a compiled loop asks for (``dgemma_jax.layouts``).

On CPU XLA picks the default layouts, so placing in *its* formats is a no-op; to exercise the
move itself the tests also place every matrix transposed in memory (a layout XLA:CPU accepts) and
check that generation gives the same tokens and that later compiles take the weights as placed.
"""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.experimental.layout import Format, Layout

import dgemma_jax
from dgemma_jax import generation as gen
from dgemma_jax import layouts, sampling
from dgemma_jax.serving.engine import Engine, EngineConfig, Request
from tests import oracle

CANVAS = 8


@pytest.fixture
def model(tmp_path):
    return dgemma_jax.from_pretrained(oracle.save(oracle.build(seed=11, canvas_length=CANVAS), tmp_path),
                                      dtype="float32")


def _loop_args(model, batch=2):
    cache = gen._prefill(model.graphdef, model.state, np.full((batch, 16), 5, np.int32),
                         np.full(batch, 3, np.int32), 16 + CANVAS)
    rows = gen.CanvasRows(gen.row_keys_from_seeds(list(range(batch))), np.zeros(batch, np.int32),
                          np.zeros(batch, bool), np.full((batch, CANVAS), -1, np.int32), np.zeros(batch, bool),
                          gen.eos_rows([1], batch), sampling.SamplerConfig().params(batch))
    return cache, rows


def _transposed(model):
    """Every matrix of the weights stored column-major: a format tree like the state's."""
    return jax.tree.map(lambda x: Format(Layout(major_to_minor=(1, 0)), x.sharding) if x.ndim == 2 else x.format,
                        model.state)


def _orders(formats):
    """Each leaf's dimension order in memory (XLA fills in ``tiling``, so formats are compared by this)."""
    return [(f.layout.major_to_minor, f.sharding) for f in jax.tree.leaves(formats)]


def _sample(model):
    return dgemma_jax.generate(model, [[2, 9, 14, 33]], max_new_tokens=2 * CANVAS, seed=[4], eos_token_ids=[]).sequences


def test_loop_formats_cover_every_weight_and_placing_them_keeps_the_outputs(model):
    before = _sample(model)
    formats = layouts.loop_weight_formats(model.graphdef, model.state, *_loop_args(model))
    assert jax.tree.structure(formats) == jax.tree.structure(model.state)
    assert all(isinstance(f, Format) and f.layout is not None for f in jax.tree.leaves(formats))
    layouts.place_weights(model, formats)
    assert [x.format for x in jax.tree.leaves(model.state)] == jax.tree.leaves(formats)
    np.testing.assert_array_equal(_sample(model), before)
    layouts.place_for_loop(model, batch=2, context=16 + 2 * CANVAS)  # the same, from abstract inputs
    assert _orders([x.format for x in jax.tree.leaves(model.state)]) == _orders(formats)
    np.testing.assert_array_equal(_sample(model), before)


def test_placed_weights_move_free_the_old_buffers_and_are_kept_by_later_compiles(model):
    before = _sample(model)
    old = jax.tree.leaves(model.state)
    target = _transposed(model)
    layouts.place_weights(model, target)
    moved = [a.ndim == 2 for a in old]
    assert any(moved)
    assert all(a.is_deleted() == m for a, m in zip(old, moved, strict=True))  # donated, not kept twice
    assert _orders([x.format for x in jax.tree.leaves(model.state)]) == _orders(target)
    # the module itself holds the placed arrays (what canvas_logits and a later split see)
    assert _orders([x.format for x in jax.tree.leaves(nnx.state(model.module))]) == _orders(target)
    loop = layouts.lower_loop(model.graphdef, model.state, *_loop_args(model)).compile()
    assert _orders(loop.input_formats[0][0]) == _orders(target)
    np.testing.assert_array_equal(_sample(model), before)


def test_engine_places_weights_when_asked_and_generates_the_same(model):
    request = Request(prompt_ids=[2, 9, 14, 33], max_new_tokens=2 * CANVAS, seed=4, eos_token_ids=())
    plain = Engine(model, EngineConfig(slots=2, max_prompt_tokens=16, max_new_tokens=2 * CANVAS)).start()
    try:
        expected = plain.generate(request).tokens
    finally:
        plain.stop()
    model_layouts = [x.format for x in jax.tree.leaves(model.state)]
    placed = Engine(model, EngineConfig(slots=2, max_prompt_tokens=16, max_new_tokens=2 * CANVAS,
                                        weight_layouts="xla")).start()
    try:
        assert placed.generate(request).tokens == expected
    finally:
        placed.stop()
    assert [x.format for x in jax.tree.leaves(model.state)] == model_layouts  # XLA:CPU keeps the defaults


def test_bad_weight_layouts_are_named(model):
    with pytest.raises(ValueError, match="weight_layouts must be one of"):
        layouts.lower_loop(model.graphdef, model.state, *_loop_args(model), weight_layouts="tiled")
    with pytest.raises(ValueError, match="EngineConfig.weight_layouts"):
        EngineConfig(weight_layouts="fast").validate()
