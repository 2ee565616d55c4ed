"""Parameters created and loaded on a fake 8-device CPU mesh give the single-device logits."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import dgemma_jax
from dgemma_jax.sharding import logical_to_spec, make_mesh
from tests import oracle

MESHES = [{"expert": 8}, {"fsdp": 2, "expert": 4}]


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    ref = oracle.build(seed=11, num_experts=8, top_k_experts=2)
    return ref, oracle.save(ref, tmp_path_factory.mktemp("hf"))


def _inputs():
    rng = np.random.default_rng(0)
    return rng.integers(0, 128, (2, 13)), rng.integers(0, 128, (2, 8))


def test_fake_devices_present():
    assert jax.device_count() >= 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"


def test_rules_table():
    mesh = make_mesh({"fsdp": 2, "expert": 4})
    assert logical_to_spec(("expert", "embed", "moe_mlp"), (8, 32, 12), mesh) == P("expert", "fsdp", None)
    assert logical_to_spec(("vocab", "embed"), (128, 32), mesh) == P(None, "fsdp")
    # a dimension the mesh axis does not divide stays whole
    assert logical_to_spec(("expert", "embed", "moe_mlp"), (6, 31, 12), mesh) == P(None, None, None)


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_loaded_on_mesh_matches_single_device(hf, shape):
    ref, path = hf
    single = dgemma_jax.from_pretrained(path, dtype="float32")
    mesh = make_mesh(shape)
    sharded = dgemma_jax.from_pretrained(path, dtype="float32", mesh=mesh)
    gate = sharded.module.layers[0].moe.gate[...]
    assert gate.sharding.spec[0] == "expert" and len(gate.sharding.device_set) == 8
    if "fsdp" in shape:
        assert sharded.module.layers[0].mlp.gate[...].sharding.spec == P("fsdp", None)
    prompt, canvas = _inputs()
    want = np.asarray(single.canvas_logits(prompt, canvas))
    np.testing.assert_allclose(np.asarray(sharded.canvas_logits(prompt, canvas)), want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(want, oracle.canvas_logits(ref, prompt, canvas), rtol=0, atol=1e-4)


def test_orbax_restores_onto_mesh(hf, tmp_path):
    single = dgemma_jax.from_pretrained(hf[1], dtype="float32")
    path = single.save_orbax(tmp_path / "native")
    sharded = dgemma_jax.from_pretrained(path, dtype="float32", mesh=make_mesh({"fsdp": 2, "expert": 4}))
    assert sharded.module.layers[0].moe.up[...].sharding.spec == P("expert", "fsdp", None)
    prompt, canvas = _inputs()
    np.testing.assert_allclose(
        np.asarray(sharded.canvas_logits(prompt, canvas)), np.asarray(single.canvas_logits(prompt, canvas)), rtol=0, atol=1e-5
    )


def test_created_on_mesh_matches_single_device(hf):
    config = dgemma_jax.from_pretrained(hf[1], dtype="float32").config
    mesh = make_mesh({"fsdp": 2, "expert": 4})
    sharded = dgemma_jax.from_config(config, seed=5, dtype="float32", mesh=mesh)
    single = dgemma_jax.from_config(config, seed=5, dtype="float32")
    assert sharded.module.layers[1].moe.down[...].sharding.spec == P("expert", None, "fsdp")
    prompt, canvas = _inputs()
    np.testing.assert_allclose(
        np.asarray(sharded.canvas_logits(prompt, canvas)), np.asarray(single.canvas_logits(prompt, canvas)), rtol=0, atol=1e-5
    )
