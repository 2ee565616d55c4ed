"""pallas_kernels.attention (interpret mode) against the XLA attention with the model's dense
masks: forward and gradients, causal / sliding / canvas / full, partly filled caches, ragged
block shapes, grouped-query heads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dgemma_jax.attention import attend, canvas_mask, encoder_mask
from pallas_kernels.attention import Blocks, flash_attention


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


def test_bad_shapes_are_named():
    q = jnp.zeros((1, 4, 3, 8))
    with pytest.raises(ValueError, match="N a multiple of K"):
        flash_attention(q, jnp.zeros((1, 2, 4, 8)), jnp.zeros((1, 2, 4, 8)), jnp.zeros(1, jnp.int32), kind="causal")
    with pytest.raises(ValueError, match="mask kind"):
        flash_attention(q, jnp.zeros((1, 3, 4, 8)), jnp.zeros((1, 3, 4, 8)), jnp.zeros(1, jnp.int32), kind="full")
