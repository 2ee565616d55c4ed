"""pallas_kernels.attention_gpu (interpret mode) against the XLA attention with the model's dense
masks: causal / sliding / canvas / full, partly filled and empty caches, ragged shapes padded to
Triton's power-of-two blocks, grouped-query heads (with several query blocks per head), the 26B
model's head dim 512."""

import jax.numpy as jnp
import numpy as np
import pytest

from dgemma_jax.attention import attend, canvas_mask, encoder_mask
from pallas_kernels.attention_gpu import GpuBlocks, gpu_attention

CASES = [  # (kind, B, T, S cache, L canvas, N, K, D, offsets, window, blocks)
    ("causal", 3, 16, 40, 0, 4, 2, 32, [0, 7, 17], None, GpuBlocks(16, 16)),
    ("causal", 2, 48, 80, 0, 4, 4, 16, [3, 22], 8, GpuBlocks(16, 16)),  # sliding: loops start past slot 0
    ("canvas", 2, 16, 24, 16, 4, 2, 32, [5, 24], None, GpuBlocks(16, 16)),  # full: filled cache + canvas
    ("canvas", 3, 16, 48, 16, 2, 1, 16, [0, 20, 48], 6, GpuBlocks(16, 16)),  # sliding, an empty cache
    ("causal", 1, 13, 37, 0, 2, 1, 8, [11], 5, GpuBlocks(16, 16)),  # ragged: padded queries, keys, head dim
    ("canvas", 2, 13, 24, 13, 4, 2, 8, [0, 21], 9, GpuBlocks(16, 16)),
    ("canvas", 1, 16, 40, 16, 8, 1, 512, [33], None, GpuBlocks(32, 32)),  # head dim 512: blocks halved
    ("canvas", 2, 48, 40, 48, 4, 2, 16, [9, 40], 20, GpuBlocks(16, 16)),  # 2 heads per group x 3 query blocks
]


@pytest.mark.parametrize("kind,b,t,s,length,n,kh,d,offsets,window,blocks", CASES)
def test_forward_matches_xla(kind, b, t, s, length, n, kh, d, offsets, window, blocks):
    rng = np.random.default_rng(t * s + n + d)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    # scores of std 4 at every head dim: exp turns a score's absolute rounding error (which grows with
    # its size) into a relative error of the output, and the tolerance below is float32 rounding
    q = normal(b, t, n, d) * 4 / np.sqrt(d)
    keys, values = normal(b, kh, s, d), normal(b, kh, s, d)
    offsets = jnp.asarray(offsets, jnp.int32)
    if kind == "causal":
        out = gpu_attention(q, keys, values, offsets, kind=kind, window=window, blocks=blocks)
        mask = encoder_mask(offsets[:, None] + jnp.arange(t)[None, :], s, window)
        want = attend(q, keys, values, mask)
    else:
        k, v = normal(b, kh, length, d), normal(b, kh, length, d)
        out = gpu_attention(q, keys, values, offsets, kind=kind, window=window, canvas=(k, v), blocks=blocks)
        mask = canvas_mask(offsets, s, length, window)
        want = attend(q, jnp.concatenate([keys, k], axis=2), jnp.concatenate([values, v], axis=2), mask)
    assert out.shape == q.shape and out.dtype == q.dtype
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)  # float32 throughout: rounding only


def test_bad_inputs_are_named():
    q, cache, offsets = jnp.zeros((1, 4, 4, 8)), jnp.zeros((1, 2, 8, 8)), jnp.zeros(1, jnp.int32)
    with pytest.raises(ValueError, match="N a multiple of K"):
        gpu_attention(q, jnp.zeros((1, 3, 8, 8)), jnp.zeros((1, 3, 8, 8)), offsets, kind="causal")
    with pytest.raises(ValueError, match="needs canvas keys"):
        gpu_attention(q, cache, cache, offsets, kind="canvas")
    with pytest.raises(ValueError, match="canvas keys .* do not fit"):
        gpu_attention(q, cache, cache, offsets, kind="canvas", canvas=(jnp.zeros((1, 2, 4, 4)),) * 2)
    with pytest.raises(ValueError, match="mask kind"):
        gpu_attention(q, cache, cache, offsets, kind="full")
