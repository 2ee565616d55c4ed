"""Test session setup: 8 fake CPU devices for the mesh tests (must precede the first jax import)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# LLVM -O0 halves XLA's CPU compile time, which dominates this suite on tiny models. It changes no
# floating-point semantics (LLVM never reassociates without fast-math); benchmarks do not use it.
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
