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


def test_bad_arguments_are_named(capsys):
    with pytest.raises(ValueError, match="--mesh 'expert'"):
        parse_mesh("expert")
    assert cli.main(["plan", "--config", str(TINY), "--programs", "canvas,decode"]) == 1
    assert "decode" in capsys.readouterr().err
