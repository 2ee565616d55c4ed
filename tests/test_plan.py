"""``dgemma plan`` on this machine's (fake) devices: abstract weights, compiled programs, the table."""

from pathlib import Path

import pytest

from dgemma_jax import cli
from dgemma_jax.cli_plan import parse_mesh
from dgemma_jax.configs_io import load_model_config
from dgemma_jax.plan import plan

TINY = Path(__file__).resolve().parents[1] / "configs" / "model" / "tiny.py"


def test_cli_prints_a_row_per_program(capsys):
    args = ["plan", "--config", str(TINY), "--mesh", "expert=1", "--programs", "canvas,loop", "--context", "64",
            "--dtype", "float32"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("program") and [line.split()[0] for line in out[2:]] == ["canvas", "loop"]


def test_expert_parallel_plan_reports_sharded_weights_and_collectives():
    config = load_model_config(TINY)
    (one,) = plan(config, {"expert": 1}, batch=8, context=64, programs=("canvas",), dtype="float32",
                  progress=lambda line: None)
    (eight,) = plan(config, {"expert": 8}, batch=8, context=64, programs=("canvas",), dtype="float32",
                    progress=lambda line: None)
    assert eight.argument_gb < one.argument_gb  # each device holds a share of the experts
    assert eight.comm_gb > 0 == one.comm_gb  # tokens gathered / results scattered over "expert"
    (int8,) = plan(config, {"expert": 8}, batch=8, context=64, programs=("canvas",), dtype="float32",
                   quantize="int8", progress=lambda line: None)
    assert int8.argument_gb < eight.argument_gb  # int8 experts (+ f32 scales) instead of f32 experts


def test_bad_arguments_are_named(capsys):
    with pytest.raises(ValueError, match="--mesh 'expert'"):
        parse_mesh("expert")
    assert cli.main(["plan", "--config", str(TINY), "--programs", "canvas,decode"]) == 1
    assert "decode" in capsys.readouterr().err
    assert cli.main(["plan", "--config", str(TINY), "--topology", "h100:x", "--programs", "canvas"]) == 1
    assert "topology 'h100:x': expected h100 or h100:<GPUs on the host>" in capsys.readouterr().err


def test_a_program_that_does_not_fit_is_reported_not_raised(monkeypatch, capsys):
    """XLA refusing a program (e.g. RESOURCE_EXHAUSTED: out of HBM on a TPU chip) is a result: the row
    says so and the other programs still run."""
    import jax

    real = jax.stages.Lowered.compile
    calls = []

    def compile_or_fail(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM\ndetails")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(jax.stages.Lowered, "compile", compile_or_fail)
    rows = plan(load_model_config(TINY), {"expert": 1}, context=64, programs=("canvas", "loop"), dtype="float32",
                progress=print)
    assert rows[0].error == "RESOURCE_EXHAUSTED: Ran out of memory on HBM" and rows[1].error is None
    assert rows[1].peak_gb > 0
    assert "canvas" in capsys.readouterr().out.split("does not compile: RESOURCE_EXHAUSTED")[0]


def test_launches_counts_device_programs_through_control_flow():
    """A loop body counts once, a conditional its larger branch; the loop and the conditional
    themselves count too (on GPU each is a round trip through the host)."""
    import jax
    import jax.numpy as jnp

    from dgemma_jax.plan import launches

    def f(x, flag):
        x = jax.lax.fori_loop(0, jnp.int32(flag.sum()), lambda i, x: jnp.sin(x) @ x, x)
        return jax.lax.cond(flag[0], lambda x: x, lambda x: jnp.tanh(x @ x) @ x, x)

    ops = launches(jax.jit(f).lower(jnp.ones((8, 8)), jnp.ones((2,), bool)).compile().as_text())
    assert ops["while"] == 1 and ops["conditional"] == 1
    assert sum(ops.values()) >= 2 + 2 + 2  # + the loop body's product and the larger branch's two
