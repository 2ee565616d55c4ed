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


def test_compile_error_keeps_the_reason_after_a_heading():
    """Mosaic's out-of-VMEM error puts its reason on the line after a heading, behind a quoted HLO
    instruction: the row keeps the reason and the link, not the HLO."""
    from dgemma_jax.plan import compile_error

    message = ("RESOURCE_EXHAUSTED: E1001: CompileTimeScopedVmemOom:\nRan out of memory in memory space vmem while "
               "allocating on stack for %flash_attention_fwd.29 = (bf16[1,2,8,256,512]{4,3,2,1,0}) custom-call("
               "%add.6855), metadata={op_name=\"jit(step)/pallas_call\"}. Scoped allocation with size 30.41M and "
               "limit 27.34M exceeded scoped vmem limit by 3.07M. \nSee https://openxla.org/xla/errors/error_1001 "
               "for more details.\n")
    assert compile_error(message) == (
        "RESOURCE_EXHAUSTED: E1001: CompileTimeScopedVmemOom: Scoped allocation with size 30.41M and limit 27.34M "
        "exceeded scoped vmem limit by 3.07M. See https://openxla.org/xla/errors/error_1001 for more details.")
    assert compile_error("RESOURCE_EXHAUSTED: Ran out of memory on HBM\ndetails") == (
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM")


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


# XLA's GPU thunk sequence, as dumped after its thunk passes (a loop's ``condition:`` label at the
# left margin, as XLA writes it): a graph, a conditional with a graph per branch, a loop whose body is
# a graph holding a loop of its own, and one kernel outside every graph.
THUNKS = """\
000: kCommandBuffer [source       | next=003 (1)]
    001: kCustomKernel [source       | next=002 (1) ] loop_fusion grid: [1, 1, 1] threads: [1, 1, 1]
    002: kCopy         [prev=001 (1) | sink         ] kCopy
003: kConditional   [prev=000 (1) | next=000 (1)]
  branch_0:
    000: kCommandBuffer [source | sink]
        004: kCustomKernel [source | sink] fusion_1 grid: [1, 1, 1] threads: [1, 1, 1]
  branch_1:
    000: kCommandBuffer [source | sink]
        005: kCustomKernel [source | sink] fusion_2 grid: [1, 1, 1] threads: [1, 1, 1]
000: kCommandBuffer [prev=003 (1) | next=006 (1)]
    006: kCustomKernel [source | sink] fusion_3 grid: [1, 1, 1] threads: [1, 1, 1]
007: kWhile         [prev=000 (1) | next=013 (1)]
condition:
    008: kCustomKernel [source | sink] wrapped_not grid: [1, 1, 1] threads: [1, 1, 1]
  body:
    000: kCommandBuffer [source | sink]
        009: kWhile [source | sink]
condition:
            010: kCustomKernel [source | sink] wrapped_not grid: [1, 1, 1] threads: [1, 1, 1]
          body:
            011: kCustomKernel [source | sink] fusion_4 grid: [1, 1, 1] threads: [1, 1, 1]
        012: kCustomKernel [source | sink] fusion_5 grid: [1, 1, 1] threads: [1, 1, 1]
013: kCustomKernel  [prev=007 (1) | sink        ] input_reduce_fusion grid: [1, 1, 1] threads: [64, 1, 1]
"""


def test_cuda_graphs_counts_graphs_and_what_the_host_launches_outside_them():
    """Graphs: the two at the top, one branch's (the larger of two equal ones) and the loop body's,
    whose inner loop is inside it. Outside: the conditional, the loop, its condition and the kernel
    at the end."""
    from dgemma_jax.plan import cuda_graphs

    assert cuda_graphs(THUNKS) == (4, 4)
    # without graphs (XLA_FLAGS=--xla_gpu_enable_command_buffer=), every thunk is the host's to launch
    assert cuda_graphs("000: kCustomKernel [source | sink] f\n001: kCopy [source | sink] kCopy\n") == (0, 2)
