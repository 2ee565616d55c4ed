"""Memory and time plan without weights: ahead-of-time compile of the model's programs for a mesh.

The parameters, the KV cache and the inputs are ``jax.ShapeDtypeStruct`` s carrying the shardings
the model's rules give them on the mesh, so nothing is allocated. The mesh is either real devices
or compile-only ones (``jax.experimental.topologies``): a TPU topology such as ``v5e:2x4`` (needs
``jax[tpu]``'s libtpu, no TPU) or H100s (``h100``; needs jax's CUDA plugin and ptxas, no GPU). For
each program, XLA reports per-chip memory (``memory_analysis``) and its cost model
(``cost_analysis``: flops, bytes accessed and, on TPU, estimated seconds); the collectives in the
compiled HLO give the communication volume per chip. For a GPU, XLA's thunk sequence tells how many
CUDA graphs a pass runs and what the host launches outside them (``cuda_graphs``).

Programs: ``canvas`` (one denoising forward pass of a canvas over the cache), ``loop`` (a canvas's
whole denoising loop and its commit, as ``generate`` runs it, with ``steps`` passes; the weights in
the layouts XLA picks for it, as serving places them), ``train``
(one LoRA step of ``configs/train/lora_26b_sft.py``'s recipe: rank 16 on attention + dense MLP,
AdamW, remat, the frozen weights placed as ``Trainer`` places them; each row holds as many whole
canvases as ``context`` has room for, after a prompt of the rest, or of one canvas when nothing is
left: 2,048 -> 256 + 8 x 256 tokens). XLA's flop and byte counts take a ``while`` body once: the
loop's one pass, the train step's one canvas of its scan over the row's canvases.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import importlib.util
import re
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dgemma_jax.cache import KVCache
from dgemma_jax.config import ModelConfig
from dgemma_jax.model import DiffusionGemma
from dgemma_jax.sharding import RULES, logical_to_spec, make_mesh, variable_sharding

# HBM per chip, its bandwidth and dense bf16 peak flop/s (public spec sheets): the weight-read
# floor and the roofline estimate.
CHIPS = {"TPU v5 lite": (16e9, 819e9, 197e12), "NVIDIA H100 80GB HBM3": (80e9, 3.35e12, 989e12)}
PROGRAMS = ("canvas", "loop", "train")
_COLLECTIVE = re.compile(r"=\s*(\(?[^=]*?\)?)\s+(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"
                         r"(-start)?\(")
_SHAPE = re.compile(r"(bf16|f16|f32|s32|u32|s8|u8|f8e4m3fn|pred)\[([0-9,]*)\]")
_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "f8e4m3fn": 1, "pred": 1}
_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) .*\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%\S+ = .*? ([a-z][a-z0-9\-]*)\((.*)$")
_NOT_LAUNCHED = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id",
                 "replica-id", "opt-barrier", "add-dependency"}  # and the "-done" halves of async ops
_THUNK = re.compile(r"^( *)\d+: (k\w+)")  # a line of XLA's GPU thunk sequence dump
_LABEL = re.compile(r"^\s*(\w+):\s*$")  # "condition:", "body:", "branch_0:", ...
PALLAS_TARGETS = ("tpu_custom_call", "__gpu$xla.gpu.triton")  # Mosaic (TPU) and Triton (GPU) kernels


@dataclasses.dataclass
class PlanRow:
    program: str
    mesh: str
    batch: int
    context: int
    argument_gb: float  # per chip: weights (+ optimizer state) + cache + inputs
    temp_gb: float
    output_gb: float
    peak_gb: float  # arguments + temporaries + outputs not aliased to arguments
    hbm_gb: float | None
    flops: float
    bytes_accessed: float
    seconds: float | None  # XLA's estimate (TPU cost model); None where the backend gives none
    roofline_s: float | None  # max(flops / peak flop/s, bytes accessed / HBM bandwidth), XLA's counts
    weight_floor_s: float | None  # per-chip weight bytes / HBM bandwidth
    comm_gb: float  # per chip: bytes produced by collectives in the compiled program
    compile_s: float
    launches: int = 0  # device programs (fusions, custom calls, other ops) run per pass; a loop body once
    pallas_kernels: int = 0  # of which Pallas kernels (Mosaic on TPU, Triton on GPU)
    graphs: int | None = None  # GPU: CUDA graphs (XLA command buffers) run per pass; None elsewhere
    outside_graphs: int | None = None  # GPU: device work launched per pass outside them, and host round trips
    error: str | None = None  # why it did not compile (e.g. XLA: out of HBM); the numbers are then 0


# An H100 SXM 80 GB as XLA's GPU compiler sees it (NVIDIA's published figures: 132 SMs, 228 KiB of
# shared memory per SM and 227 KiB per block, 50 MiB of L2, 3.35 TB/s, 1.98 GHz boost).
H100_TARGET = """gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 shared_memory_per_block_optin: 232448 threads_per_core_limit: 2048
  core_count: 132 fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: 3352320000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 84929347584 registers_per_core_limit: 65536 registers_per_block_limit: 65536
  cuda_compute_capability { major: 9 minor: 0 }
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
runtime_version { major: %d minor: 0 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""


def is_gpu_topology(name: str | None) -> bool:
    """Whether ``--topology`` names H100s (``h100``, ``h100:8``) rather than a TPU slice."""
    return name is not None and name.lower().startswith("h100")


def cuda_plugin() -> int | None:
    """The CUDA major version of the jax CUDA plugin installed (13 or 12), None without one."""
    return next((v for v in (13, 12) if importlib.util.find_spec(f"jax_cuda{v}_plugin")), None)


def topology_devices(name: str):
    """Compile-only devices for a topology, no accelerator needed: ``"v5e:2x4"`` (TPU; needs libtpu)
    or ``"h100"`` / ``"h100:8"`` (that many H100s on one host; needs the jax-cuda13-plugin or
    jax-cuda12-plugin matching this jax, and ptxas from a CUDA toolkit on PATH)."""
    from jax.experimental import topologies

    if not is_gpu_topology(name):
        return topologies.get_topology_desc(platform="tpu", topology_name=name).devices
    count = name.partition(":")[2] or "1"
    if not count.isdigit() or int(count) < 1:
        raise ValueError(f"topology {name!r}: expected h100 or h100:<GPUs on the host>, e.g. h100:8")
    cuda = cuda_plugin()
    if cuda is None:
        raise ValueError(f"topology {name!r} needs jax's CUDA plugin to compile for GPU: pip install "
                         f"'jax[cuda13-local]=={jax.__version__}' (no GPU or CUDA libraries needed; ptxas on PATH)")
    target = H100_TARGET % cuda
    try:
        return topologies.get_topology_desc(platform="cuda", target_config=target, topology=f"1x1x{count}").devices
    except NotImplementedError as e:  # the plugin was set up as a runtime backend and failed (no GPU)
        raise ValueError(f"topology {name!r}: compiling for GPU without one needs JAX_PLATFORMS=cpu (set "
                         f"before JAX starts; `dgemma plan` sets it)") from e


def _kernel_target(devices):
    """A context that makes the compile-only GPU the default device while programs are lowered: jax
    >= 0.11 reads the GPU a Pallas Triton kernel is built for from the default device, which is this
    process's CPU. A no-op for other devices."""
    return jax.default_device(devices[0]) if devices[0].platform == "gpu" else contextlib.nullcontext()


def _abstract_state(config: ModelConfig, dtype, mesh: Mesh, rules=RULES, quantize: str = "none"):
    """-> (graphdef, state, module): every parameter a ShapeDtypeStruct with its sharding on ``mesh``."""
    from dgemma_jax.quant import quantize as quantize_module

    abstract = nnx.eval_shape(lambda: quantize_module(
        DiffusionGemma(config, rngs=nnx.Rngs(0), dtype=jnp.dtype(dtype), mesh=mesh), quantize))
    for _, var in nnx.iter_graph(abstract):
        if isinstance(var, nnx.Variable):
            var.set_value(jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=variable_sharding(var, mesh, rules)))
    graphdef, state = nnx.split(abstract)
    return graphdef, state, abstract


def _batch_sharded(shape, dtype, mesh: Mesh):
    spec = logical_to_spec(("batch",) + (None,) * (len(shape) - 1), shape, mesh, RULES)
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))


def _replicated(x, mesh: Mesh):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, PartitionSpec()))


def _abstract_cache(config: ModelConfig, batch: int, context: int, dtype, mesh: Mesh) -> KVCache:
    """The cache ``generate`` makes for ``context`` positions (``KVCache.for_positions``), over ``mesh``."""
    cache = jax.eval_shape(lambda: KVCache.for_positions(config, batch, context, dtype))
    return jax.tree.map(lambda x: _batch_sharded(x.shape, x.dtype, mesh), cache)


def _collective_bytes(hlo: str) -> int:
    total = 0
    for match in _COLLECTIVE.finditer(hlo):
        for dt, dims in _SHAPE.findall(match.group(1)):
            total += _BYTES[dt] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
    return total


def compile_error(message: str) -> str:
    """XLA's reason for refusing a program, in one line: its first line, and where that is only a
    heading (TPU: "RESOURCE_EXHAUSTED: E1001: CompileTimeScopedVmemOom:"), the sentences after it
    that do not quote HLO (e.g. "Scoped allocation with size 30.41M and limit 27.34M exceeded ...")."""
    first, _, rest = message.strip().partition("\n")
    if not first.endswith(":"):
        return first
    sentences = [s.strip() for s in " ".join(rest.split()).split(". ") if s.strip() and "%" not in s]
    return " ".join([first] + [s.rstrip(".") + "." for s in sentences])


def _compile(lowered, gpu: bool):
    """-> (compiled program, XLA's thunk sequence for a GPU program, else None). The sequence, with
    the CUDA graphs XLA groups its kernels into, is only written to XLA's dump files, so a GPU
    program is compiled with a dump to a temporary folder."""
    if not gpu:
        return lowered.compile(), None
    with tempfile.TemporaryDirectory() as folder:
        compiled = lowered.compile(compiler_options={"xla_dump_to": folder})
        dumps = sorted(Path(folder).glob("*thunk_sequence_after_thunk_passes.txt"))
        return compiled, dumps[-1].read_text() if dumps else None


def cuda_graphs(thunks: str) -> tuple[int, int]:
    """-> (CUDA graphs, thunks outside them) run per pass, from XLA's thunk sequence of a GPU program
    (the dump ``*.thunk_sequence_after_thunk_passes.txt``). A ``kCommandBuffer`` is one CUDA graph,
    launched whole; every other thunk the host launches on its own, and a ``kWhile`` or
    ``kConditional`` waits for the device to tell it its predicate. A loop body counts once, a
    conditional its largest branch (as in ``launches``)."""
    lines = []  # (indent, thunk kind) or (None, label of a loop part or branch)
    for line in thunks.splitlines():
        if (thunk := _THUNK.match(line)) is not None:
            lines.append((len(thunk.group(1)), thunk.group(2)))
        elif (label := _LABEL.match(line)) is not None:
            lines.append((None, label.group(1)))

    def next_depth(i: int) -> int:
        """The indent of the first thunk from lines[i] on (-1 at the end). Labels carry none: XLA
        writes a loop's ``condition:`` at the left margin."""
        return next((lines[j][0] for j in range(i, len(lines)) if lines[j][0] is not None), -1)

    def walk(i: int, parent: int) -> tuple[int, int, int]:
        """The thunks from lines[i] indented deeper than ``parent``: -> (graphs, outside, next line)."""
        graphs = outside = 0
        while i < len(lines) and lines[i][0] is not None and lines[i][0] > parent:
            indent, kind = lines[i]
            i += 1
            if kind == "kCommandBuffer":  # its commands, and the parts of loops among them, are in the graph
                graphs += 1
                while i < len(lines) and next_depth(i) > indent:
                    i += 1
                continue
            outside += 1
            parts = []
            while i < len(lines) and lines[i][0] is None:  # a loop's condition and body, or the branches
                g, o, i = walk(i + 1, indent)
                parts.append((g, o))
            if parts and kind == "kWhile":
                graphs, outside = graphs + sum(g for g, _ in parts), outside + sum(o for _, o in parts)
            elif parts:
                g, o = max(parts, key=sum)
                graphs, outside = graphs + g, outside + o
        return graphs, outside, i

    graphs, outside, _ = walk(0, -1)
    return graphs, outside


def launches(hlo: str) -> dict[str, int]:
    """Operations of a compiled program that each launch a device program (fusions, custom calls by
    target, unfused ops such as copies and collectives), counted from the entry computation through
    the control flow it calls; a ``while`` body counts once, a ``conditional`` its largest branch."""
    computations: dict[str, list[tuple[str, str]]] = {}  # name -> [(op, the rest of its line)]
    body = entry = None
    for line in hlo.splitlines():
        if (start := _COMPUTATION.match(line)) is not None:
            body = computations.setdefault(start.group(1), [])
            entry = start.group(1) if line.startswith("ENTRY") else entry
        elif line.startswith("}"):
            body = None
        elif body is not None and (ins := _INSTRUCTION.match(line)) is not None:
            body.append((ins.group(1), ins.group(2)))

    def count(name: str) -> collections.Counter:
        total = collections.Counter()
        for op, rest in computations[name]:
            if op in ("while", "conditional"):  # on GPU each is a round trip through the host
                total[op] += 1
            if op == "while":
                loop = re.search(r"condition=%([^,\s]+).*body=%([^,\s]+)", rest)
                total += count(loop.group(1)) + count(loop.group(2))
            elif op == "conditional":
                listed = re.search(r"branch_computations=\{([^}]*)\}", rest)
                branches = re.findall(r"%([^,\s]+)", listed.group(1)) if listed else \
                    re.findall(r"(?:true|false)_computation=%([^,\s]+)", rest)
                total += max((count(b) for b in branches), key=lambda c: sum(c.values()))
            elif op == "call":
                total += count(re.search(r"to_apply=%([^,\s]+)", rest).group(1))
            elif op == "custom-call":
                total[re.search(r'custom_call_target="([^"]+)"', rest).group(1)] += 1
            elif op not in _NOT_LAUNCHED and not op.endswith("-done"):
                total[op] += 1
        return total

    return dict(count(entry))


def _lower_canvas(config, graphdef, state, mesh, batch, context, dtype):
    def canvas_step(state, canvas, cache, sc_logits):
        return nnx.merge(graphdef, state).denoise(canvas, cache, sc_logits, jnp.ones((canvas.shape[0],), bool))

    length = config.canvas_length
    args = (state, _batch_sharded((batch, length), jnp.int32, mesh),
            _abstract_cache(config, batch, context, dtype, mesh),
            _batch_sharded((batch, length, config.vocab_size), dtype, mesh))
    return jax.jit(canvas_step).lower(*args)


def loop_inputs(config: ModelConfig, batch: int, context: int, dtype, mesh: Mesh, steps: int = 16):
    """The denoising loop's cache and per-row inputs as ShapeDtypeStructs, the batch over ``mesh``'s
    batch axes: (cache, rows)."""
    from dgemma_jax.generation import CanvasRows, eos_rows
    from dgemma_jax.sampling import SamplerConfig

    length = config.canvas_length
    row_keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), batch))
    rows = CanvasRows(row_keys, np.zeros(batch, np.int32), np.zeros(batch, bool), np.zeros((batch, length), np.int32),
                      np.zeros(batch, bool), eos_rows(config.eos_token_ids, batch),
                      SamplerConfig(max_denoising_steps=steps).params(batch))
    rows = jax.tree.map(lambda x: _batch_sharded(x.shape, x.dtype, mesh), rows)
    return _abstract_cache(config, batch, context, dtype, mesh), rows


def _lower_loop(config, graphdef, state, mesh, batch, context, dtype, steps, weight_layouts):
    from dgemma_jax.layouts import lower_loop

    cache, rows = loop_inputs(config, batch, context, dtype, mesh, steps)
    return lower_loop(graphdef, state, cache, rows, weight_layouts=weight_layouts)


def _lower_train(config, abstract, mesh, batch, context, rank, weight_layouts):
    import optax

    from dgemma_jax.layouts import lower_train_step
    from dgemma_jax.training import lora as lora_lib
    from dgemma_jax.training.objective import ObjectiveConfig
    from dgemma_jax.training.trainer import make_train_step

    lora_cfg = lora_lib.LoraConfig(rank, 2.0 * rank, ("attn", "mlp"))
    graphdef, frozen, rest = nnx.split(abstract, nnx.Param, ...)
    replicated = NamedSharding(mesh, PartitionSpec())
    adapters = jax.eval_shape(lambda p: lora_lib.init(p, lora_cfg, seed=0), frozen)
    adapters = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), adapters)
    tx = optax.adamw(1.5e-4, b1=0.95, b2=0.99, weight_decay=1e-4)
    opt_state = jax.eval_shape(lambda a: tx.init(jax.tree.map(lambda x: x.astype(jnp.float32), a)), adapters)
    opt_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), opt_state)
    n = context // config.canvas_length * config.canvas_length  # response canvases after a prompt
    prompt = context - n if context > n else config.canvas_length
    train_batch = dict(tokens=_batch_sharded((batch, prompt + n), jnp.int32, mesh),
                       prompt_len=_batch_sharded((batch,), jnp.int32, mesh),
                       loss_mask=_batch_sharded((batch, n), jnp.float32, mesh))
    def step(adapters, opt_state, frozen, batch, key, rest):  # ``rest`` (buffers) as an argument, not a constant
        run = make_train_step(graphdef, rest, tx, ObjectiveConfig(), lora_cfg, 1, config.vocab_size)
        return run(adapters, opt_state, frozen, batch, key)

    key = _replicated(jax.eval_shape(lambda: jax.random.key(0)), mesh)
    return lower_train_step(step, adapters, opt_state, frozen, train_batch, key, rest, weight_layouts=weight_layouts)


def plan(config: ModelConfig, mesh_shape: dict[str, int], *, topology: str | None = None, batch: int = 1,
         context: int = 4096, programs=PROGRAMS, dtype="bfloat16", steps: int = 16, lora_rank: int = 16,
         quantize: str = "none", weight_layouts: str = "xla", progress=print) -> list[PlanRow]:
    """Compiles ``programs`` for the mesh ``mesh_shape`` over ``topology``'s devices (or this
    machine's) and reads their per-chip memory and cost. ``context``: KV-cache positions (serving)
    or tokens per training row. ``config``'s back ends are used as given (e.g. ``pallas`` on TPU).
    ``quantize="int8"``: the serving programs with int8 experts (the train step stays float).
    ``weight_layouts``: the loop's weights and the train step's frozen base weights in the layouts
    XLA picks (``"xla"``, as serving and ``Trainer`` on TPU place them: ``dgemma_jax.layouts``) or
    as they arrive (``"default"``)."""
    devices = topology_devices(topology) if topology else jax.devices()
    mesh = make_mesh(mesh_shape, devices)
    graphdef, state, abstract = _abstract_state(config, dtype, mesh, quantize=quantize)
    kind = devices[0].device_kind
    hbm, bandwidth, peak_flops = CHIPS.get(kind, (None, None, None))
    weight_bytes = sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
                       for x in jax.tree.leaves(state))
    rows = []
    name = ",".join(f"{k}={v}" for k, v in mesh_shape.items())
    for program in programs:
        t0 = time.perf_counter()
        with _kernel_target(devices):
            if program == "canvas":
                lowered = _lower_canvas(config, graphdef, state, mesh, batch, context, dtype)
            elif program == "loop":
                lowered = _lower_loop(config, graphdef, state, mesh, batch, context, dtype, steps, weight_layouts)
            elif program == "train":
                from dgemma_jax.training.trainer import training_attention_impl, training_moe_impl

                train_config = config.replace(
                    remat=True, moe_impl=training_moe_impl(config.moe_impl, devices[0].platform),
                    attention_impl=training_attention_impl(config.attention_impl))
                _, _, abstract_train = _abstract_state(train_config, dtype, mesh)
                lowered = _lower_train(train_config, abstract_train, mesh, batch, context, lora_rank, weight_layouts)
            else:
                raise ValueError(f"program {program!r}: expected one of {PROGRAMS}")
        try:
            compiled, thunks = _compile(lowered, devices[0].platform == "gpu")
        except jax.errors.JaxRuntimeError as e:  # e.g. RESOURCE_EXHAUSTED: does not fit a chip
            row = PlanRow(program=program, mesh=name, batch=batch, context=context, argument_gb=0.0, temp_gb=0.0,
                          output_gb=0.0, peak_gb=0.0, hbm_gb=hbm * 1e-9 if hbm else None, flops=0.0,
                          bytes_accessed=0.0, seconds=None, roofline_s=None, weight_floor_s=None, comm_gb=0.0,
                          compile_s=time.perf_counter() - t0, error=compile_error(str(e)))
            progress(format_row(row))
            rows.append(row)
            continue
        seconds = time.perf_counter() - t0
        hlo = compiled.as_text()
        ops = launches(hlo)
        graphs, outside = cuda_graphs(thunks) if thunks is not None else (None, None)
        mem = compiled.memory_analysis()
        cost = compiled.cost_analysis()
        cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
        est = cost.get("optimal_seconds")
        flops, bytes_accessed = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
        gb = 1e-9
        peak = mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
        row = PlanRow(
            program=program, mesh=name, batch=batch, context=context,
            argument_gb=mem.argument_size_in_bytes * gb, temp_gb=mem.temp_size_in_bytes * gb,
            output_gb=mem.output_size_in_bytes * gb, peak_gb=peak * gb, hbm_gb=hbm * gb if hbm else None,
            flops=flops, bytes_accessed=bytes_accessed,
            seconds=est if est is not None and est > 0 else None,
            roofline_s=max(flops / peak_flops, bytes_accessed / bandwidth) if bandwidth and cost else None,
            weight_floor_s=weight_bytes / bandwidth if bandwidth else None,
            comm_gb=_collective_bytes(hlo) * gb, compile_s=seconds,
            launches=sum(ops.values()), pallas_kernels=sum(ops.get(t, 0) for t in PALLAS_TARGETS),
            graphs=graphs, outside_graphs=outside,
        )
        progress(format_row(row))
        rows.append(row)
    return rows


HEADER = (f"{'program':<8}{'mesh':<22}{'batch':>6}{'context':>8}{'args GB':>9}{'temp GB':>9}{'peak GB':>9}"
          f"{'HBM GB':>8}{'TFLOP':>8}{'est ms':>9}{'roof ms':>9}{'floor ms':>9}{'comm GB':>9}{'kernels':>9}{'pallas':>7}"
          f"{'graphs':>7}{'outside':>8}{'compile s':>10}")


def format_row(r: PlanRow) -> str:
    def opt(x, scale=1.0, fmt="{:.2f}"):
        return "-" if x is None else fmt.format(x * scale)

    if r.error:
        return f"{r.program:<8}{r.mesh:<22}{r.batch:>6}{r.context:>8}  does not compile: {r.error}"
    return (f"{r.program:<8}{r.mesh:<22}{r.batch:>6}{r.context:>8}{r.argument_gb:>9.2f}{r.temp_gb:>9.2f}"
            f"{r.peak_gb:>9.2f}{opt(r.hbm_gb, fmt='{:.0f}'):>8}{r.flops * 1e-12:>8.2f}{opt(r.seconds, 1e3):>9}"
            f"{opt(r.roofline_s, 1e3):>9}{opt(r.weight_floor_s, 1e3):>9}{r.comm_gb:>9.3f}{r.launches:>9}"
            f"{r.pallas_kernels:>7}{opt(r.graphs, fmt='{:.0f}'):>7}{opt(r.outside_graphs, fmt='{:.0f}'):>8}"
            f"{r.compile_s:>10.1f}")
