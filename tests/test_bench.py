"""The parts of the GPU benchmarks that decide what they measure, run here on CPU."""

import torch
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

from bench.gpu_profile import summarize
from bench.gpu_step import _materialize
from tests import oracle


def _tie_groups(model):
    groups = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(p.data_ptr(), []).append(name)
    return sorted(sorted(names) for names in groups.values())


def test_materialized_transformers_model_is_the_plain_build():
    """gpu_step builds the peer on the meta device and allocates each tied tensor once (the plain
    build of the 26B model holds both copies of the shared weights: more than an 80 GB card). The
    result must be the model a plain build gives: same parameters, the same ties, the same buffers,
    the same constant initialisations, nothing left on meta."""
    cfg = DiffusionGemmaConfig(text_config=oracle.text_config(), vision_config=dict(oracle.TINY_VISION),
                               canvas_length=8)
    cfg._experts_implementation = "eager"
    torch.manual_seed(0)
    plain = DiffusionGemmaForBlockDiffusion._from_config(cfg, dtype=torch.float32).eval()
    built = _materialize(DiffusionGemmaForBlockDiffusion, cfg, torch.float32, "cpu")

    ours, theirs = dict(built.named_parameters()), dict(plain.named_parameters())
    assert ours.keys() == theirs.keys()
    assert _tie_groups(built) == _tie_groups(plain)
    assert any(len(group) > 1 for group in _tie_groups(built))  # the encoder shares the decoder's weights
    for name, p in theirs.items():
        p, q = p.detach(), ours[name]
        assert (q.shape, q.dtype, q.device.type) == (p.shape, p.dtype, "cpu"), name
        assert torch.isfinite(q).all(), name
        if p.numel() == 1 or p.std() == 0:  # constant inits (norm scales, router scales) must match
            assert torch.equal(q, p), name
        else:
            assert 0.5 < float(q.std() / p.std()) < 2, name
    buffers = dict(plain.named_buffers())
    assert dict(built.named_buffers()).keys() == buffers.keys()
    for name, b in built.named_buffers():
        assert torch.equal(b, buffers[name]), name

    prompt, canvas = torch.randint(0, cfg.text_config.vocab_size, (2, 1, 8))
    with torch.no_grad():
        assert torch.isfinite(built(input_ids=prompt, decoder_input_ids=canvas).logits).all()


def test_profile_summary_sums_the_streams_per_step_and_folds_numbering():
    events = [("Stream #14", "fusion.1", 3_000_000), ("Stream #14", "fusion.2", 1_000_000),
              ("Stream #14", "gemm_7", 2_000_000), ("Stream #272", "fusion.3", 4_000_000),
              ("XLA Modules", "jit_denoise", 12_000_000)]
    s = summarize(events, steps=2, top=5)
    assert s["busy_lines"] == ["Stream #14", "Stream #272"]  # the conditional's stream counts too
    assert s["lines"] == {"Stream #14": 3.0, "Stream #272": 2.0, "XLA Modules": 6.0}
    assert s["busy_ms"] == 5.0 and s["ops_per_step"] == 2.0
    assert s["grouped"] == [("fusion", 4.0), ("gemm", 1.0)]
    assert s["top"][0] == ("fusion.3", 2.0)
    # without streams (CPU threads) the busiest line's ops are listed
    cpu = summarize([("python", "a", 9_000_000), ("worker", "b", 4_000_000)], steps=1, top=5)
    assert cpu["busy_lines"] == ["python"] and cpu["busy_ms"] == 9.0


def test_moe_bench_tilings_parse():
    """bench/moe.py's tiling sweep: every default variant is a valid GpuTiling, and a typo is an error."""
    import pytest

    from bench.moe import GPU_TILINGS, parse_tiling
    from pallas_kernels.expert_ffn import GpuTiling

    assert parse_tiling("default") == GpuTiling()
    assert parse_tiling("bm=16,num_warps=8") == GpuTiling(bm=16, num_warps=8)
    assert len({parse_tiling(t) for t in GPU_TILINGS}) == len(GPU_TILINGS)
    with pytest.raises(SystemExit, match="'warps=8' is not NAME=INT"):
        parse_tiling("warps=8")


def test_moe_bench_reports_a_failing_tiling_and_goes_on(capsys):
    """On a GPU a blind kernel variant may not compile: bench/moe.py prints it, times the rest, and
    exits non-zero."""
    import os

    from bench.moe import ROOT, main

    rc = main(["--config", os.path.join(ROOT, "configs", "model", "tiny.py"), "--canvases", "1", "--repeats", "1",
               "--impls", "bucketed", "--quantize", "none", "--tilings", "bn=0", "default"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "kernels: bn=0" in out and "failed:" in out and "ZeroDivisionError" in out
    assert [line for line in out.splitlines() if "kernels: default" in line and "failed" not in line]
    assert "FAILED: " in out and "fastest at" in out


def test_triton_compile_finds_the_kernels_triton_ir():
    """bench/triton_compile.py hands upstream Triton the IR jax puts in the XLA custom calls: both
    expert kernels, as parseable Triton IR text with the launch settings of the call."""
    import jax
    import jax.numpy as jnp

    from bench.triton_compile import triton_modules
    from pallas_kernels.common import lower_for_gpu
    from pallas_kernels.expert_ffn import GpuTiling, expert_ffn

    s = jax.ShapeDtypeStruct
    shapes = [s((32, 64), jnp.bfloat16), s((256,), jnp.int32), s((256,), jnp.int32), s((8,), jnp.int32),
              s((8, 64, 32), jnp.int8), s((8, 64, 32), jnp.int8), s((8, 32, 64), jnp.int8), s((8, 32), jnp.float32),
              s((8, 32), jnp.float32), s((8, 64), jnp.float32)]
    tiling = GpuTiling(bm=32, num_warps=2, interpret=False)
    run = jax.jit(lambda x, index, order, *a: expert_ffn(x, *a, row_index=index, out_index=order, tiling=tiling))
    found = triton_modules(lower_for_gpu(run, *shapes))
    assert [(name, warps, grid) for name, warps, _, grid, _ in found] == [
        ("expert_gate_up", 2, "1x16"), ("expert_down", 2, "1x16")]  # 256 // 32 + 8 visits
    for name, _, _, _, text in found:
        assert text.startswith(f"module @{name}") and "tt.dot" in text and "loc(" not in text


def test_triton_compile_finds_the_attention_kernel():
    """The GPU attention kernel's Triton IR and its three-dimensional grid (batch, key/value head,
    query block: 2 query heads per key/value head x 32 queries / 16 per block)."""
    import jax
    import jax.numpy as jnp

    from bench.triton_compile import triton_modules
    from pallas_kernels.common import lower_for_gpu
    from pallas_kernels.attention_gpu import GpuBlocks, gpu_attention

    s = jax.ShapeDtypeStruct
    q, cache, offsets = s((2, 32, 4, 64), jnp.bfloat16), s((2, 2, 64, 64), jnp.bfloat16), s((2,), jnp.int32)
    run = jax.jit(lambda *a: gpu_attention(*a, kind="causal", window=16, blocks=GpuBlocks(16, 16, 4, interpret=False)))
    found = triton_modules(lower_for_gpu(run, q, cache, cache, offsets))
    assert [(name, warps, grid) for name, warps, _, grid, _ in found] == [("flash_attention_causal", 4, "2x2x4")]
    assert "tt.dot" in found[0][4] and "scf.for" in found[0][4]  # the key loop, with run-time bounds


def test_attention_bench_blocks_parse():
    import pytest

    from bench.attention import GPU_BLOCKS, parse_blocks
    from pallas_kernels.attention_gpu import GpuBlocks

    assert parse_blocks("q=32,num_warps=4") == GpuBlocks(q=32, num_warps=4)
    assert len({parse_blocks(b) for b in GPU_BLOCKS}) == len(GPU_BLOCKS)
    with pytest.raises(SystemExit, match="--blocks 'bq=32'"):
        parse_blocks("bq=32")


def test_attention_bench_runs_and_checks_the_kernel(capsys):
    """bench/attention.py on a small config on CPU (the kernel interpreted): both back ends agree and
    are timed for both passes of both layer types."""
    import os

    from bench.attention import ROOT, main

    rc = main(["--config", os.path.join(ROOT, "configs", "model", "tiny.py"), "--canvases", "2", "--repeats", "1",
               "--context", "24"])
    out = capsys.readouterr().out
    assert rc == 0, out
    timed = [line.split()[:5] for line in out.splitlines()[2:] if not line.startswith("fastest")]
    assert len(timed) == 8 and {(r[1], r[3]) for r in timed} == {(p, i) for p in ("canvas", "causal")
                                                                   for i in ("xla", "pallas_gpu")}
    assert sum(line.startswith("fastest for ") for line in out.splitlines()) == 4


def test_tpu_attention_bench_counts_the_blocks_that_move():
    """bench/tpu_attention.py's count of the bytes a kernel's blocks move: a block moves when its
    index differs from the previous grid step's; index maps that read a scalar-prefetch operand."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import tpu as pltpu

    from bench.tpu_attention import block_traffic

    def kernel(scalars, x_ref, y_ref, o_ref):
        o_ref[...] = x_ref[...] + y_ref[...]

    spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1, grid=(2, 3),
        in_specs=[pl.BlockSpec((8, 128), lambda i, j, s: (i, 0)),  # moves at each i: 2 times
                  pl.BlockSpec((8, 128), lambda i, j, s: (jnp.minimum(j, s[0]), 0))],  # j = 0, 1, 1, 0, 1, 1: 4
        out_specs=pl.BlockSpec((8, 128), lambda i, j, s: (i * 3 + j, 0)))  # every step: 6
    call = pl.pallas_call(kernel, grid_spec=spec, out_shape=jax.ShapeDtypeStruct((48, 128), jnp.float32),
                          interpret=True, name="add")
    x = jax.ShapeDtypeStruct((16, 128), jnp.float32)
    jaxpr = jax.make_jaxpr(call)(jax.ShapeDtypeStruct((1,), jnp.int32), x, x).jaxpr
    block = 8 * 128 * 4
    assert block_traffic(jaxpr, [jnp.array([1], jnp.int32)]) == [("add", (2, 3), (2 + 4 + 6) * block)]
    assert block_traffic(jaxpr, [jnp.array([2], jnp.int32)]) == [("add", (2, 3), (2 + 6 + 6) * block)]


def test_tpu_attention_bench_counts_blocks_in_hbm_tiles():
    """A block moves whole (8 x 128)-word tiles: a float32 column fills 128 lanes, bf16 packs 16 rows
    to a tile, a row of lanes ([.., 1, N], which XLA tiles (1, 128)) moves its values."""
    from bench.tpu_attention import tiled_bytes

    assert tiled_bytes((256, 1), 4) == 256 * 128 * 4
    assert tiled_bytes((8, 256, 512), 2) == 8 * 256 * 512 * 2
    assert tiled_bytes((8, 1, 256), 4) == 8 * 256 * 4
    assert tiled_bytes((8, 1, 200), 4) == 8 * 256 * 4
    assert tiled_bytes((24, 130), 1) == 32 * 256
    assert tiled_bytes((300,), 4) == 1200


def test_tpu_attention_bench_runs_for_v5e(capsys):
    """bench/tpu_attention.py on a small config, compiled for v5e:2x4 (needs libtpu): a row per
    layer type, pass and program, the gradient with the dq and dk/dv kernels."""
    import importlib.util
    import os

    import pytest

    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu (jax[tpu]) not installed")
    from bench.tpu_attention import ROOT, main

    assert main(["--config", os.path.join(ROOT, "configs", "model", "bench.py"), "--context", "256"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert {(r[0], r[1], r[2]) for r in rows} == {(layer, kind, program) for layer in ("sliding", "full")
                                                  for kind in ("causal", "canvas")
                                                  for program in ("forward", "gradient")}
    assert all(float(r[4]) > 0 and "dkv" in r for r in rows if r[2] == "gradient")
