"""Test session setup: 8 fake CPU devices for the mesh tests (must precede the first jax import)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# LLVM -O0 halves XLA's CPU compile time, which dominates this suite on tiny models. It changes no
# floating-point semantics (LLVM never reassociates without fast-math); benchmarks do not use it.
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The TPU tests only compile: let them load libtpu while another JAX process (a training run in a
# venv with jax[tpu]) holds its lock file.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import gc  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops every compiled program after each test module. XLA:CPU maps each executable's code in
    many memory regions (~1,000 for one of our generate programs); over the whole suite one process
    would pass Linux's vm.max_map_count (65,530) and XLA would crash in the next compile."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def sudoku_recipe():
    """train/sudoku.py (not a package module) loaded by path: STAGES, GENERATION_CONFIG, main."""
    import importlib.util
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "train" / "sudoku.py"
    spec = importlib.util.spec_from_file_location("train_sudoku", script)
    recipe = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = recipe  # its dataclasses resolve their annotations through it
    spec.loader.exec_module(recipe)
    return recipe
