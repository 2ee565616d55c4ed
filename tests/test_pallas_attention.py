"""pallas_kernels.attention (interpret mode) against the XLA attention with the model's dense
masks: forward and gradients, causal / sliding / canvas / full, partly filled caches, ragged
block shapes, grouped-query heads."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dgemma_jax.attention import attend, canvas_mask, encoder_mask
from pallas_kernels.attention import Blocks, Mask, flash_attention


def _reference(q, k, v, offsets, kind, window, cache_size):
    b, t = q.shape[:2]
    if kind == "causal":
        positions = offsets[:, None] + jnp.arange(t)[None, :]
        mask = encoder_mask(positions, k.shape[2], window)
    else:
        mask = canvas_mask(offsets, cache_size, k.shape[2] - cache_size, window)
    return attend(q, k, v, mask)


CASES = [  # (kind, B, T, S, N, K, D, offsets, window, cache_size, blocks)
    ("causal", 2, 16, 40, 4, 2, 32, [0, 7], None, 0, Blocks(8, 8)),
    ("causal", 2, 24, 48, 4, 4, 16, [3, 24], 8, 0, Blocks(8, 16)),  # sliding: whole blocks skipped
    ("canvas", 2, 16, 40, 4, 2, 32, [5, 24], None, 24, Blocks(8, 8)),  # full: filled cache + canvas
    ("canvas", 3, 16, 48, 2, 1, 16, [0, 20, 32], 6, 32, Blocks(8, 8)),  # sliding, an empty cache
    ("causal", 1, 13, 37, 2, 1, 8, [11], 5, 0, Blocks(8, 8)),  # ragged: padded queries and keys
    ("canvas", 2, 13, 37, 4, 2, 8, [0, 24], 9, 24, Blocks(8, 8)),
    ("canvas", 2, 10, 35, 2, 1, 8, [19, 25], None, 25, Blocks(8, 8)),  # a key block holds cache and canvas
    # each pass's default blocks (256 x 256; the canvas pass's query block is the whole canvas)
    ("causal", 1, 520, 520, 4, 2, 8, [0], 300, 0, Blocks()),
    ("canvas", 2, 256, 768, 4, 2, 8, [0, 300], None, 512, Blocks()),
    ("canvas", 1, 256, 768, 2, 1, 8, [400], 300, 512, Blocks()),
]


@pytest.mark.parametrize("kind,b,t,s,n,kh,d,offsets,window,cache_size,blocks", CASES)
def test_forward_and_gradients_match_xla(kind, b, t, s, n, kh, d, offsets, window, cache_size, blocks):
    rng = np.random.default_rng(t * s + n)
    q, do = (jnp.asarray(rng.standard_normal((b, t, n, d)), jnp.float32) for _ in range(2))
    k, v = (jnp.asarray(rng.standard_normal((b, kh, s, d)), jnp.float32) for _ in range(2))
    offsets = jnp.asarray(offsets, jnp.int32)
    args = dict(kind=kind, window=window, cache_size=cache_size)

    out = flash_attention(q, k, v, offsets, blocks=blocks, **args)
    want = _reference(q, k, v, offsets, kind, window, cache_size)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)

    ours = jax.grad(lambda *a: jnp.sum(flash_attention(*a, offsets, blocks=blocks, **args) * do), (0, 1, 2))(q, k, v)
    ref = jax.grad(lambda *a: jnp.sum(_reference(*a, offsets, kind, window, cache_size) * do), (0, 1, 2))(q, k, v)
    for got, exp in zip(ours, ref):
        np.testing.assert_allclose(got, exp, rtol=1e-4, atol=1e-4 * float(jnp.abs(exp).max()))


@pytest.mark.parametrize("b,t,s,n,kh,d,offsets,window,cache_size,blocks",
                         [c[1:] for c in CASES if c[0] == "canvas"])
def test_canvas_keys_read_in_place_match_the_concatenated_keys(b, t, s, n, kh, d, offsets, window, cache_size,
                                                               blocks):
    """``canvas=(k, v)``: the cache and the canvas keys as two inputs (or concatenated inside when
    the cache does not end on a key block, cache_size 25 with blocks of 8) give the output and the
    gradients, of the cache and the canvas keys each, of the keys concatenated beforehand."""
    rng = np.random.default_rng(t * s + n + 1)
    q, do = (jnp.asarray(rng.standard_normal((b, t, n, d)), jnp.float32) for _ in range(2))
    k, v = (jnp.asarray(rng.standard_normal((b, kh, s, d)), jnp.float32) for _ in range(2))
    offsets = jnp.asarray(offsets, jnp.int32)

    def joined(q, k, v):
        return flash_attention(q, k, v, offsets, kind="canvas", window=window, cache_size=cache_size, blocks=blocks)

    def split(q, k, v):
        cut = lambda x: (x[:, :, :cache_size], x[:, :, cache_size:])  # noqa: E731
        (kc, kn), (vc, vn) = cut(k), cut(v)
        return flash_attention(q, kc, vc, offsets, kind="canvas", window=window, canvas=(kn, vn), blocks=blocks)

    np.testing.assert_allclose(split(q, k, v), joined(q, k, v), rtol=1e-5, atol=1e-5)
    ours, ref = (jax.grad(lambda *a: jnp.sum(fn(*a) * do), (0, 1, 2))(q, k, v) for fn in (split, joined))
    for got, exp in zip(ours, ref):
        np.testing.assert_allclose(got, exp, rtol=1e-5, atol=1e-5 * float(jnp.abs(exp).max()))


def test_canvas_keys_without_a_cache():
    """``canvas=(k, v)`` with a cache of no slots: attention over the canvas alone, and its gradients."""
    rng = np.random.default_rng(3)
    q, do = (jnp.asarray(rng.standard_normal((2, 12, 4, 8)), jnp.float32) for _ in range(2))
    k, v = (jnp.asarray(rng.standard_normal((2, 2, 12, 8)), jnp.float32) for _ in range(2))
    offsets, empty = jnp.zeros(2, jnp.int32), jnp.zeros((2, 2, 0, 8), jnp.float32)

    def ours(q, k, v, empty):
        out = flash_attention(q, empty, empty, offsets, kind="canvas", canvas=(k, v), blocks=Blocks(8, 8))
        return jnp.sum(out * do)

    def ref(q, k, v):
        return jnp.sum(_reference(q, k, v, offsets, "canvas", None, 0) * do)

    got = jax.grad(ours, (0, 1, 2, 3))(q, k, v, empty)
    assert got[3].shape == empty.shape
    np.testing.assert_allclose(ours(q, k, v, empty), ref(q, k, v), rtol=1e-5)
    for g, want in zip(got, jax.grad(ref, (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))


def test_blocks_left_unset_take_the_pass_defaults():
    assert Blocks(q=64).for_pass("causal") == Blocks(64, 256, vmem_mib=32)
    assert Blocks(k=128, interpret=True).for_pass("canvas") == Blocks(256, 128, vmem_mib=32, interpret=True)
    with pytest.raises(ValueError, match="mask kind 'decoder'"):
        Blocks().for_pass("decoder")


def test_bad_shapes_are_named():
    q = jnp.zeros((1, 4, 3, 8))
    with pytest.raises(ValueError, match="N a multiple of K"):
        flash_attention(q, jnp.zeros((1, 2, 4, 8)), jnp.zeros((1, 2, 4, 8)), jnp.zeros(1, jnp.int32), kind="causal")
    with pytest.raises(ValueError, match="mask kind"):
        flash_attention(q, jnp.zeros((1, 3, 4, 8)), jnp.zeros((1, 3, 4, 8)), jnp.zeros(1, jnp.int32), kind="full")
    keys = jnp.zeros((1, 3, 4, 8))
    with pytest.raises(ValueError, match="canvas keys"):
        flash_attention(q, keys, keys, jnp.zeros(1, jnp.int32), kind="canvas", canvas=(keys[:, :2], keys[:, :2]))
    with pytest.raises(ValueError, match="takes no canvas keys"):
        flash_attention(q, keys, keys, jnp.zeros(1, jnp.int32), kind="causal", canvas=(keys, keys))


@pytest.mark.parametrize("kind,window,cache_size,num_keys,bq,bk", [
    ("causal", None, 0, 40, 8, 8), ("causal", 8, 0, 48, 8, 16), ("causal", 5, 0, 37, 8, 8),
    ("canvas", None, 24, 40, 8, 8), ("canvas", 6, 32, 48, 8, 8), ("canvas", 9, 24, 37, 8, 8),
    ("canvas", None, 25, 35, 8, 8), ("canvas", 6, 30, 40, 8, 8),  # a block holds cache and canvas slots
    ("canvas", 1024, 4096, 4352, 128, 128),  # a 26B sliding layer at context 4,096: 11 of 34 blocks
])
def test_the_grid_walks_exactly_the_visible_key_blocks(kind, window, cache_size, num_keys, bq, bk):
    """Each query block's real steps visit every key block the mask shows it, once, in order; the
    steps after them repeat the last one (no new tile is fetched); no more steps than ``key_steps``."""
    mask = Mask(kind, window, cache_size, num_keys)
    blocks = -(-num_keys // bk)
    steps = mask.key_steps(bq, bk, blocks)
    for offset in range(0, (cache_size or num_keys) + 1, 3):
        for qi in range(2):
            walk = [tuple(int(x) for x in mask.key_block(offset, qi, j, bq, bk, blocks)) for j in range(steps)]
            real = [block for block, is_real in walk if is_real]
            want = [j for j in range(blocks)
                    if mask.block_visible(offset, qi * bq, (qi + 1) * bq, j * bk, (j + 1) * bk)]
            assert real == want, (offset, qi, walk)
            last = real[-1] if real else walk[0][0]  # (no block: queries past the keys, not a real call)
            assert all(not is_real and block == last for block, is_real in walk[len(real):])
            assert all(0 <= block < blocks for block, _ in walk)
    if kind == "canvas" and window == 1024:
        assert steps == 11 and blocks == 34


@pytest.mark.parametrize("kind,window,cache_size,num_keys,num_queries,bq,bk", [
    ("causal", None, 0, 40, 16, 8, 8), ("causal", 8, 0, 48, 24, 8, 16), ("causal", 5, 0, 37, 13, 8, 8),
    ("causal", 1024, 0, 2048, 2048, 128, 128),  # a 26B sliding layer encoding 2,048 tokens: 10 of 16 blocks
    ("canvas", None, 24, 40, 16, 8, 8), ("canvas", 6, 32, 48, 16, 8, 8), ("canvas", 6, 30, 40, 13, 8, 8),
])
def test_the_dkv_grid_walks_exactly_the_query_blocks_that_see_a_key_block(kind, window, cache_size, num_keys,
                                                                          num_queries, bq, bk):
    """The dk/dv kernel's walk: for each key block, its real steps visit every query block the mask
    lets see it, once, in order; the steps after them repeat the last one; no more than ``query_steps``."""
    mask = Mask(kind, window, cache_size, num_keys)
    blocks, q_blocks = -(-num_keys // bk), -(-num_queries // bq)
    steps = mask.query_steps(bq, bk, q_blocks)
    for offset in range(0, (cache_size or num_keys) + 1, 3 if num_keys < 1000 else 256):
        for ki in range(blocks):
            walk = [tuple(int(x) for x in mask.query_block(offset, ki, j, bq, bk, q_blocks)) for j in range(steps)]
            real = [block for block, is_real in walk if is_real]
            want = [i for i in range(q_blocks)
                    if mask.block_visible(offset, i * bq, (i + 1) * bq, ki * bk, (ki + 1) * bk)]
            assert real == want, (offset, ki, walk)
            assert all(not is_real and block == walk[len(real) - 1 if real else 0][0]
                       for block, is_real in walk[len(real):])
            assert all(0 <= block < q_blocks for block, _ in walk)
    if window == 1024:
        assert steps == 10


@pytest.mark.parametrize("kh,d,window,blocks,want", [
    (8, 256, 1024, Blocks(128, 128), [(1, 8, 2, 11), (1, 8, 2, 11), (1, 8, 34, 2)]),
    (2, 512, None, Blocks(128, 128), [(1, 2, 2, 34), (1, 2, 2, 34), (1, 2, 34, 2)]),
    (8, 256, 1024, Blocks(), [(1, 8, 1, 6), (1, 8, 1, 6), (1, 8, 17, 1)]),  # the canvas pass's default blocks
    (2, 512, None, Blocks(), [(1, 2, 1, 17), (1, 2, 1, 17), (1, 2, 17, 1)]),
])
def test_26b_grids_run_over_key_value_heads_and_visible_blocks(kh, d, window, blocks, want):
    """The 26B canvas pass at context 4,096 (16 query heads) and its gradient: one program per
    key/value head (its query heads as one block's rows), the forward and dq kernels walking a query
    block's visible key blocks (sliding layers: 11 of 34 with 128-key blocks); the dk/dv kernel writes
    each key/value head's gradients of the cache and the canvas keys where they are. Before:
    (1, 16, 2, 34) on both layer kinds for the forward and dq, (1, 16, 34, 2) for dk/dv, the keys
    concatenated for the backward and the per-query-head gradients summed afterwards. The default
    blocks hold the whole canvas as one query block, and 256 keys."""
    q = jax.ShapeDtypeStruct((1, 256, 16, d), jnp.bfloat16)
    cache, canvas = (jax.ShapeDtypeStruct((1, kh, size, d), jnp.bfloat16) for size in (4096, 256))

    def attention(q, kc, vc, kn, vn):
        return flash_attention(q, kc, vc, jnp.array([4096], jnp.int32), kind="canvas", window=window,
                               canvas=(kn, vn), blocks=dataclasses.replace(blocks, interpret=True))

    def eqns(jaxpr):  # also those inside the custom VJP's and the pallas_calls' jaxprs
        for e in jaxpr.eqns:
            yield e
            for inner in e.params.values():
                inner = getattr(inner, "jaxpr", inner)
                if hasattr(inner, "eqns"):
                    yield from eqns(inner)

    def grids(jaxpr):
        return [tuple(e.params["grid_mapping"].grid) for e in eqns(jaxpr) if e.primitive.name == "pallas_call"]

    gradient = jax.grad(lambda *a: jnp.sum(attention(*a).astype(jnp.float32)), (0, 1, 2, 3, 4))
    forward = jax.make_jaxpr(attention)(q, cache, cache, canvas, canvas).jaxpr
    assert grids(forward) == want[:1]
    # a forward that nothing differentiates writes no log-sum-exp ([.., 1] float32 rows, lane-padded in HBM)
    assert [len(e.outvars) for e in eqns(forward) if e.primitive.name == "pallas_call"] == [1]
    jaxpr = jax.make_jaxpr(gradient)(q, cache, cache, canvas, canvas).jaxpr
    assert grids(jaxpr) == want
    assert [len(e.outvars) for e in eqns(jaxpr) if e.primitive.name == "pallas_call"][0] == 2  # o and lse
    assert "concatenate" not in {e.primitive.name for e in eqns(jaxpr)}
