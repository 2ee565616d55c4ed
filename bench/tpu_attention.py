"""The TPU attention kernels against XLA's attention at one layer's real shapes, forward and gradient,
compiled for a TPU v5e topology on a host without a TPU (libtpu from ``jax[tpu]``): the bytes each
moves per chip. No TPU here, so nothing is timed: bytes over v5e's 819 GB/s bound the time.

    PYTHONPATH=. python bench/tpu_attention.py                          # 26B-A4B on v5e:2x4, context 2,048
    PYTHONPATH=. python bench/tpu_attention.py --context 4096 --programs forward
    PYTHONPATH=. python bench/tpu_attention.py --passes canvas --q-block 128 --k-block 128   # other blocks

For each layer type of ``--config`` (sliding, full) and pass (``canvas``: the denoising pass over
``--context`` filled cache slots and a canvas; ``causal``: the encoder pass over ``--context`` tokens,
as training encodes a row), one batch row per chip, and program (``forward``; ``gradient``: forward
and backward, as a train step runs them):
  xla     ``attention_impl="xla"`` (dense masks, float32 scores): the bytes XLA's cost model counts
          for the compiled program
  pallas  ``attention_impl="pallas"``: XLA's count for the ops around the kernels, plus the bytes the
          kernels move between HBM and VMEM, which XLA's count does not see, read from their block
          index maps (a block moves when its index differs from the previous grid step's), in the
          tiles of HBM's layout (``tiled_bytes``); and each kernel's grid
XLA counts every operand of every fused op, some of them held in VMEM, so both sides are upper bounds
of HBM traffic; the ratio is pallas / xla (lower is better).
"""

from __future__ import annotations

import argparse
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V5E_BANDWIDTH = 819e9  # bytes/s of HBM per v5e chip


def tiled_bytes(shape, itemsize: int) -> int:
    """Bytes of a block of ``shape`` as XLA lays arrays out in a TPU's HBM and a DMA moves them: in
    tiles of (8 sublanes x 128 lanes) of 32-bit words, so the last dimension is padded to 128 and the
    one before it to 8 (16 for 16-bit types, packed two to a word; 32 for 8-bit ones); an array
    whose dimension before the last is 1 gets (1, 128) tiles. A column of float32 [rows, 1] takes
    128x its bytes, a row [1, lanes] its own."""
    import numpy as np

    if len(shape) < 2:
        return int(np.prod(shape)) * itemsize
    *outer, rows, lanes = shape
    sublanes = 1 if rows == 1 else 8 * max(1, 4 // itemsize)
    return int(np.prod(outer)) * -(-rows // sublanes) * sublanes * -(-lanes // 128) * 128 * itemsize


def block_traffic(jaxpr, scalars) -> list[tuple[str, tuple[int, ...], int]]:
    """(name, grid, bytes) of each ``pallas_call`` in ``jaxpr`` and the jaxprs it calls, the bytes that
    its inputs' and outputs' blocks move over its grid: a block counts each time its index differs
    from the one at the previous grid step (what Pallas' TPU pipeline fetches or writes back).
    ``scalars``: the values of the scalar-prefetch operands the index maps read."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax._src.state.discharge import discharge_state  # the index maps take the scalars as refs

    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            mapping = eqn.params["grid_mapping"]
            grid = tuple(int(g) for g in mapping.grid)
            steps = np.stack(np.meshgrid(*map(np.arange, grid), indexing="ij"), -1).reshape(-1, len(grid))
            total = 0
            for block in mapping.block_mappings:
                index_map = discharge_state(block.index_map_jaxpr)
                rank = len(block.block_shape)

                def indices(step, index_map=index_map, rank=rank):
                    outs = jax.core.eval_jaxpr(index_map.jaxpr, index_map.consts, *step, *scalars)
                    return jnp.stack([jnp.asarray(x, jnp.int32) for x in outs[:rank]])

                at = np.asarray(jax.vmap(lambda s: indices(list(s)))(jnp.asarray(steps, jnp.int32)))
                moves = 1 + int(np.any(at[1:] != at[:-1], axis=1).sum())
                size = tiled_bytes(block.transformed_block_aval.shape, block.array_aval.dtype.itemsize)
                total += moves * size
            found.append((eqn.params.get("name") or "pallas_call", grid, total))
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", value)
            if hasattr(inner, "eqns"):
                found += block_traffic(inner, scalars)
    return found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "model", "diffusiongemma_26b_a4b.py"))
    p.add_argument("--topology", default="v5e:2x4")
    p.add_argument("--context", type=int, default=2048,
                   help="filled cache slots (canvas pass) or tokens encoded (causal pass)")
    p.add_argument("--passes", default="causal,canvas")
    p.add_argument("--programs", default="forward,gradient")
    p.add_argument("--q-block", type=int, default=None, help="the kernels' query block (default: theirs)")
    p.add_argument("--k-block", type=int, default=None, help="the kernels' key block (default: theirs)")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from dgemma_jax.attention import attend_canvas, attend_causal
    from dgemma_jax.config import SLIDING
    from dgemma_jax.configs_io import load_model_config
    from dgemma_jax.plan import topology_devices
    from dgemma_jax.sharding import make_mesh
    from pallas_kernels.attention import Blocks

    config = load_model_config(args.config)
    devices = topology_devices(args.topology)
    mesh = make_mesh({"data": len(devices)}, devices)
    b, length, n = len(devices), config.canvas_length, config.num_heads
    sizes = {name: size for name, size in (("q", args.q_block), ("k", args.k_block)) if size is not None}
    blocks = Blocks(interpret=False, **sizes)  # the Mosaic kernels alone in the traced program (compiled for TPU)
    print(f"config {os.path.relpath(args.config, ROOT)} | bf16 | {args.topology}, one row per chip | context "
          f"{args.context} | GB per chip; time bound at {V5E_BANDWIDTH / 1e9:.0f} GB/s")
    print(f"{'layer':>8}{'pass':>8}{'program':>10}{'xla GB':>9}{'pallas GB':>11}{'(around':>9}{'+ kernels)':>11}"
          f"{'ratio':>7}{'xla ms':>8}{'pallas ms':>10}  kernel grids")
    for layer_type in sorted(set(config.layer_types)):
        d, kh = config.layer_head_dim(layer_type), config.layer_kv_heads(layer_type)
        window = config.sliding_window if layer_type == SLIDING else None
        for kind in args.passes.split(","):
            cache = (kh, args.context, d)
            if kind == "canvas":
                shapes = [(length, n, d), cache, cache, (kh, length, d), (kh, length, d)]

                def attention(impl, q, keys, values, k, v, offsets, mesh=mesh):
                    return attend_canvas(q, keys, values, k, v, offsets, window, impl, mesh, blocks=blocks)
            else:
                shapes = [(args.context, n, d), cache, cache]

                def attention(impl, q, keys, values, offsets, mesh=mesh):
                    return attend_causal(q, keys, values, offsets, window, impl, mesh, blocks=blocks)

            rows = NamedSharding(mesh, P("data"))
            inputs = [jax.ShapeDtypeStruct((b, *shape), jnp.bfloat16, sharding=rows) for shape in shapes]
            inputs.append(jax.ShapeDtypeStruct((b,), jnp.int32, sharding=rows))
            offsets = jnp.asarray([args.context if kind == "canvas" else 0], jnp.int32)
            for program in args.programs.split(","):
                def build(impl, mesh=mesh, program=program):
                    def run(*a):
                        return attention(impl, *a, mesh=mesh)
                    if program == "forward":
                        return run
                    return jax.grad(lambda *a: jnp.sum(run(*a).astype(jnp.float32)), tuple(range(len(shapes))))

                counted = {}
                for impl in ("xla", "pallas"):
                    cost = jax.jit(build(impl)).lower(*inputs).compile().cost_analysis()
                    counted[impl] = (cost[0] if isinstance(cost, list) else cost)["bytes accessed"]
                one_row = [jax.ShapeDtypeStruct((1, *x.shape[1:]), x.dtype) for x in inputs]
                kernels = block_traffic(jax.make_jaxpr(build("pallas", None))(*one_row).jaxpr, [offsets])
                moved = sum(size for _, _, size in kernels)
                ours = counted["pallas"] + moved
                grids = "; ".join(f"{name.removeprefix('flash_attention_')} {grid}" for name, grid, _ in kernels)
                print(f"{layer_type.split('_')[0]:>8}{kind:>8}{program:>10}{counted['xla'] / 1e9:>9.3f}"
                      f"{ours / 1e9:>11.3f}{counted['pallas'] / 1e9:>9.3f}{moved / 1e9:>11.3f}"
                      f"{ours / counted['xla']:>7.2f}{counted['xla'] / V5E_BANDWIDTH * 1e3:>8.2f}"
                      f"{ours / V5E_BANDWIDTH * 1e3:>10.2f}  {grids}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
