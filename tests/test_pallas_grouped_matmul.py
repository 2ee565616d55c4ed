"""pallas_kernels.grouped_matmul (interpret mode) against a plain XLA reference: forward and
gradients, ragged and empty groups, several tilings, sharded experts (group_offset)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.common import exact_block
from pallas_kernels.grouped_matmul import Tiling, gmm, grouped_matmul, tgmm


def _reference(lhs, rhs, sizes, offset):
    """Row r of group g (global) -> lhs[r] @ rhs[g - offset] when that group is local, else 0."""
    ends = jnp.cumsum(sizes)
    group = jnp.searchsorted(ends, jnp.arange(lhs.shape[0]), side="right") - offset  # [M]
    local = (group >= 0) & (group < rhs.shape[0])
    w = rhs[jnp.clip(group, 0, rhs.shape[0] - 1)]  # [M, K, N]
    out = jnp.einsum("mk,mkn->mn", lhs, w, precision="highest")
    return jnp.where(local[:, None], out, 0)


CASES = [  # (M, K, N, global group sizes, offset, local groups, tiling)
    (64, 32, 48, [10, 20, 4, 30], 0, 4, Tiling(tm=16, tk=128, tn=128)),  # tiles straddle groups
    (50, 24, 40, [0, 13, 0, 0, 22, 0], 0, 6, Tiling(tm=8)),  # empty groups, rows after the last group
    (96, 40, 56, [7, 9, 30, 0, 25, 25], 2, 3, Tiling(tm=16)),  # a shard of experts 2..4
    (100, 200, 300, [33, 1, 66], 0, 3, Tiling(tm=32, tk=128, tn=128)),  # several k and n tiles, padding
    (40, 16, 16, [10, 10, 0, 0, 20], 2, 2, Tiling(tm=8)),  # every local group empty
    (37, 8, 136, [37], 0, 1, Tiling(tm=8, tn=128)),  # one group, odd M
    (48, 384, 176, [0, 30, 18], 0, 3, Tiling(tm=16, tk=256, tn=128)),  # blocks that divide K (128) / span N (176)
]


@pytest.mark.parametrize("m,k,n,sizes,offset,groups,tiling", CASES)
def test_forward_and_gradients_match_xla(m, k, n, sizes, offset, groups, tiling):
    rng = np.random.default_rng(m + n)
    lhs = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    rhs = jnp.asarray(rng.standard_normal((groups, k, n)), jnp.float32)
    cot = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)
    sizes = jnp.asarray(sizes, jnp.int32)

    out = gmm(lhs, rhs, sizes, offset, tiling=tiling)
    want = _reference(lhs, rhs, sizes, offset)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max() + 1))

    def loss(fn, a, b):
        return jnp.sum(fn(a, b) * cot)

    ours = jax.grad(lambda a, b: loss(lambda x, y: grouped_matmul(x, y, sizes, offset, tiling), a, b), (0, 1))(lhs, rhs)
    ref = jax.grad(lambda a, b: loss(lambda x, y: _reference(x, y, sizes, offset), a, b), (0, 1))(lhs, rhs)
    for got, exp in zip(ours, ref):
        np.testing.assert_allclose(got, exp, rtol=1e-4, atol=1e-4 * float(jnp.abs(exp).max() + 1))


def test_tgmm_zeroes_empty_groups_and_traced_offset_works_under_jit():
    rng = np.random.default_rng(0)
    lhs = jnp.asarray(rng.standard_normal((24, 8)), jnp.float32)
    grad = jnp.asarray(rng.standard_normal((24, 16)), jnp.float32)
    sizes = jnp.asarray([8, 0, 16, 0], jnp.int32)
    out = jax.jit(lambda off: tgmm(lhs, grad, sizes, 2, off, tiling=Tiling(tm=8)))(jnp.int32(1))
    np.testing.assert_array_equal(out[0], 0)  # group 1 is empty
    np.testing.assert_allclose(out[1], lhs[8:].T @ grad[8:], rtol=1e-5, atol=1e-5)


def test_bfloat16_inputs_accumulate_in_float32():
    rng = np.random.default_rng(1)
    lhs = jnp.asarray(rng.standard_normal((64, 256)), jnp.bfloat16)
    rhs = jnp.asarray(rng.standard_normal((2, 256, 128)), jnp.bfloat16)
    sizes = jnp.asarray([20, 44], jnp.int32)
    out = gmm(lhs, rhs, sizes, tiling=Tiling(tm=16, tk=128))
    want = _reference(lhs.astype(jnp.float32), rhs.astype(jnp.float32), sizes, 0)
    assert out.dtype == jnp.bfloat16
    # one bf16 rounding of the output (8 mantissa bits): relative error <= 2^-8
    np.testing.assert_allclose(out.astype(jnp.float32), want, rtol=2**-8, atol=2**-8 * float(jnp.abs(want).max()))


def test_mismatched_shapes_are_named():
    with pytest.raises(ValueError, match="do not contract"):
        gmm(jnp.zeros((8, 4)), jnp.zeros((2, 5, 3)), jnp.asarray([4, 4]))


def test_blocks_divide_the_dims_where_they_can():
    assert exact_block(1536, 2816, 128) == 1408  # the 26B expert width: 2 blocks, not 2 padded to 3072
    assert exact_block(1536, 704, 128) == 704  # the 26B expert hidden size: one whole block, no lane padding
    assert exact_block(128, 2048, 8) == 128
    assert exact_block(512, 704, 128) == 512  # no multiple of 128 divides 704: padded to 1024
    assert exact_block(8, 37, 8) == 8


@pytest.mark.parametrize("transpose_rhs", [False, True])
def test_26b_expert_weights_are_neither_padded_nor_sliced(transpose_rhs):
    """Padding the weights to the blocks copies every expert's weights on every call: on TPU v5e:2x4
    that was 15.7 GB of extra traffic per canvas pass (docs/scaling.md). The default tiling takes the
    26B shapes as they are, in both kernels (gmm, tgmm) and both directions."""
    lhs = jax.ShapeDtypeStruct((2048, 2816), jnp.bfloat16)
    rhs = jax.ShapeDtypeStruct((16, 704, 2816) if transpose_rhs else (16, 2816, 704), jnp.bfloat16)
    sizes = jax.ShapeDtypeStruct((128,), jnp.int32)

    def copies(fn, *args):  # pads, and slices of matrices (the group bounds' scalars are sliced too)
        return [e for e in jax.make_jaxpr(fn)(*args).eqns if str(e.primitive) == "pad"
                or (str(e.primitive) == "slice" and e.invars[0].aval.ndim > 1)]

    assert not copies(lambda a, b, s: gmm(a, b, s, 0, transpose_rhs=transpose_rhs), lhs, rhs, sizes)
    grad = jax.ShapeDtypeStruct((2048, 704), jnp.bfloat16)
    assert not copies(lambda a, g, s: tgmm(a, g, s, 16), lhs, grad, sizes)
