"""The blocked ``"xla"`` kernel (model/kernels/xla*.py): its tiling (blocks, chunks, padding),
its band and looped schedules, dropout, memory, and queries at an offset into the keys."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from model import local_attention
from model.kernels.xla import xla_local_attention
from tests.model.inputs import qkv
from tests.model.reference import dense_local_attention


# (batch, heads, seq_len, head_dim, window_size_left, window_size_right, block_size):
# shapes that are not multiples of the block, zero-width sides, windows longer than the
# sequence, a single position, and several chunks (block 16 on 300 positions).
CASES = [
    (2, 3, 100, 16, 7, 3, None),
    (1, 2, 300, 32, 64, 0, None),
    (2, 1, 257, 8, 0, 0, 16),
    (1, 2, 50, 8, 200, 300, None),
    (1, 1, 513, 16, 100, 40, 32),
    (2, 2, 300, 8, 20, 20, 16),
    (1, 1, 1, 4, 5, 0, None),
    (3, 1, 37, 24, 0, 9, 8),
]


def _jax_reference(q, k, v, left, right, mask=None):
    """jax.nn.dot_product_attention in its (batch, seq, heads, dim) layout."""
    swap = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
    out = jax.nn.dot_product_attention(swap(q), swap(k), swap(v), mask=mask,
                                       local_window_size=(left, right))
    return swap(out)


@pytest.mark.parametrize("batch,heads,n,d,left,right,block", CASES)
def test_matches_jax_dot_product_attention_forward_and_gradients(
        batch, heads, n, d, left, right, block):
    q, k, v = qkv((batch, heads, n, d))
    ours = lambda q, k, v: local_attention(  # noqa: E731
        q, k, v, window_size_left=left, window_size_right=right, block_size=block)
    theirs = lambda q, k, v: _jax_reference(q, k, v, left, right)  # noqa: E731
    np.testing.assert_allclose(ours(q, k, v), theirs(q, k, v), atol=2e-5, rtol=2e-5)
    cotangent = jax.random.normal(jax.random.key(1), q.shape)
    grads = [jax.jit(jax.grad(lambda *a, f=f: jnp.sum(f(*a) * cotangent), argnums=(0, 1, 2)))(
        q, k, v) for f in (ours, theirs)]
    for ours_grad, their_grad in zip(*grads):
        np.testing.assert_allclose(ours_grad, their_grad, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("batch,heads,n,d,left,right,block", CASES)
def test_masks_segments_and_relative_positions_match_dense_reference(
        batch, heads, n, d, left, right, block):
    q, k, v = qkv((batch, heads, n, d), seed=2)
    keys = jax.random.split(jax.random.key(3), 3)
    mask = jax.random.bernoulli(keys[0], 0.7, (batch, 1, n))
    segment_ids = jnp.cumsum(jax.random.bernoulli(keys[1], 0.05, (batch, 1, n)), axis=-1)
    rel_pos_emb = jax.random.normal(keys[2], (heads, left + right + 1, d))
    kwargs = dict(mask=mask, segment_ids=segment_ids)

    def ours(q, k, v, rel):
        return local_attention(q, k, v, rel_pos_emb=rel, window_size_left=left,
                               window_size_right=right, block_size=block, **kwargs)

    def reference(q, k, v, rel):
        return dense_local_attention(q, k, v, left, right, rel_pos_emb=rel, **kwargs)

    np.testing.assert_allclose(ours(q, k, v, rel_pos_emb), reference(q, k, v, rel_pos_emb),
                               atol=2e-5, rtol=2e-5)
    cotangent = jax.random.normal(jax.random.key(4), q.shape)
    grads = [jax.jit(jax.grad(lambda *a, f=f: jnp.sum(f(*a) * cotangent), argnums=(0, 1, 2, 3)))(
        q, k, v, rel_pos_emb) for f in (ours, reference)]
    for ours_grad, their_grad in zip(*grads):
        np.testing.assert_allclose(ours_grad, their_grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("left,right", [(6, 2), (39, 0)])  # the band schedule; the looped one
def test_scale_and_logit_soft_cap_match_the_dense_reference(left, right):
    """Gemma 2's attention: logits ``scale · q·k`` (the relative positions' part included, in
    the band schedule), then ``cap · tanh(s / cap)`` before the mask. Forward and gradients
    (the custom VJP's derivative of the cap) against the dense reference, with a key mask,
    documents and grouped heads; scores of order several against a cap of 1.5, so it binds."""
    n, d, heads = 40, 8, 4
    q = qkv((2, heads, n, d), seed=30)[0]
    k, v = qkv((2, 2, n, d), seed=31)[1:]
    keys = jax.random.split(jax.random.key(32), 4)
    kwargs = dict(mask=jax.random.bernoulli(keys[0], 0.8, (2, 1, n)),
                  segment_ids=jnp.cumsum(jax.random.bernoulli(keys[1], 0.05, (2, 1, n)), -1))
    # The looped schedule (a window over the sequence) has no relative positions.
    rel = jax.random.normal(keys[2], (heads, left + right + 1, d)) if right else None
    options = dict(scale=0.8, logit_soft_cap=1.5)
    repeat = lambda x: jnp.repeat(x, 2, axis=1)  # noqa: E731

    def ours(q, k, v, rel):
        return local_attention(q, k, v, rel_pos_emb=rel, window_size_left=left,
                               window_size_right=right, block_size=8, **kwargs, **options)

    def reference(q, k, v, rel, **options):
        return dense_local_attention(q, repeat(k), repeat(v), left, right, rel_pos_emb=rel,
                                     **kwargs, **options)

    cotangent = jax.random.normal(keys[3], q.shape)

    def value_and_grads(f):
        def loss(*args):
            out = f(*args)
            return jnp.sum(out * cotangent), out
        argnums = (0, 1, 2, 3) if rel is not None else (0, 1, 2)
        return jax.jit(jax.value_and_grad(loss, argnums, has_aux=True))(q, k, v, rel)

    (_, out), grads = value_and_grads(ours)
    (_, expected), expected_grads = value_and_grads(functools.partial(reference, **options))
    np.testing.assert_allclose(out, expected, atol=2e-5, rtol=2e-5)
    for ours_grad, their_grad in zip(grads, expected_grads, strict=True):
        np.testing.assert_allclose(ours_grad, their_grad, atol=1e-4, rtol=1e-4)
    # The scale and the cap matter: without them the reference differs.
    assert float(jnp.abs(expected - jax.jit(reference)(q, k, v, rel)).max()) > 0.1


@pytest.mark.parametrize("window", [8, 16])  # the band schedule, the looped one (2·33 >= 64)
def test_dropout_is_deterministic_per_key_and_drops_the_requested_fraction(window):
    n, rate = 64, 0.3
    q, k, _ = qkv((2, 2, n, n))
    # With v = identity the output row i is the (dropped, rescaled) attention weights of i.
    v = jnp.broadcast_to(jnp.eye(n), q.shape)
    kwargs = dict(window_size_left=window, window_size_right=window, block_size=16)
    f = lambda key: local_attention(q, k, v, dropout_rate=rate, dropout_rng=key, **kwargs)  # noqa: E731
    first, again, other = f(jax.random.key(7)), f(jax.random.key(7)), f(jax.random.key(8))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    weights = local_attention(q, k, v, **kwargs)
    kept = first != 0
    visible = weights != 0
    np.testing.assert_allclose(first[kept], weights[kept] / (1 - rate), rtol=1e-5)
    assert not bool(jnp.any(kept & ~visible))
    dropped_fraction = 1 - kept.sum() / visible.sum()
    assert abs(float(dropped_fraction) - rate) < 0.03


@pytest.mark.parametrize("left", [5, 30])  # the band schedule, the looped one
def test_dropout_gradients_match_finite_differences(left):
    q, k, v = qkv((1, 2, 24, 4))
    key = jax.random.key(9)
    f = lambda q, k, v: local_attention(q, k, v, window_size_left=left, window_size_right=2,  # noqa: E731
                                        dropout_rate=0.2, dropout_rng=key, block_size=8)
    check_grads(f, (q, k, v), order=1, modes=["rev"], atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("window", [256, 16383])  # local; global (the looped schedule)
def test_memory_is_linear_in_sequence_length(window):
    # A dense (n, n) score matrix at n = 16384 with 4 heads would take 4 GiB; the blocked
    # kernel's forward+backward needs O(n·d) plus one chunk.
    n, heads, d = 16384, 4, 64
    spec = jax.ShapeDtypeStruct((1, heads, n, d), jnp.float32)
    grad = jax.jit(jax.grad(lambda q, k, v: local_attention(
        q, k, v, window_size_left=window, window_size_right=0).sum(), argnums=(0, 1, 2)))
    temp_bytes = grad.lower(spec, spec, spec).compile().memory_analysis().temp_size_in_bytes
    inputs_bytes = heads * n * d * 4
    assert temp_bytes < 24 * inputs_bytes, temp_bytes


def test_a_window_over_the_whole_sequence_is_causal_attention():
    """What a global layer runs: the blocked kernel with a window as long as the sequence
    equals jax's causal attention (forward and gradients), with grouped key/value heads."""
    q = qkv((1, 4, 300, 8), seed=9)[0]
    k, v = qkv((1, 2, 300, 8), seed=10)[1:]

    def ours(q, k, v):
        return local_attention(q, k, v, window_size_left=300, window_size_right=0)

    def causal(q, k, v):
        swap = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
        return swap(jax.nn.dot_product_attention(swap(q), swap(k), swap(v), is_causal=True))

    np.testing.assert_allclose(ours(q, k, v), causal(q, k, v), atol=2e-5, rtol=2e-5)
    grads = [jax.grad(lambda *a, f=f: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2))(q, k, v)
             for f in (ours, causal)]
    for ours_grad, their_grad in zip(*grads):
        np.testing.assert_allclose(ours_grad, their_grad, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("n,block", [(300, None), (257, 64), (130, 16)])
def test_a_global_window_with_segments_and_grouped_heads_equals_jax_attention(n, block, dtype):
    """The looped schedule that global layers run (each query block visits only the key
    blocks at or before it) against jax.nn.dot_product_attention with a causal and
    same-document mask: packed documents, 4 query heads over 2 key/value heads, lengths that
    are not multiples of the block."""
    q = qkv((2, 4, n, 16), seed=11)[0].astype(dtype)
    k, v = (x.astype(dtype) for x in qkv((2, 2, n, 16), seed=12)[1:])
    segment_ids = jnp.cumsum(jax.random.bernoulli(jax.random.key(13), 0.01, (2, 1, n)), axis=-1)

    def ours(q, k, v):
        return local_attention(q, k, v, window_size_left=n - 1, window_size_right=0,
                               segment_ids=segment_ids, block_size=block)

    def reference(q, k, v):
        swap = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
        position = jnp.arange(n)
        visible = ((position[:, None] >= position[None, :])
                   & (segment_ids[..., :, None] == segment_ids[..., None, :]))
        return swap(jax.nn.dot_product_attention(swap(q), swap(k), swap(v), mask=visible))

    # bfloat16 against the float32 reference of the same (rounded) inputs; tolerances as in
    # test_bfloat16_within_tolerance_of_float32.
    tolerance = 5e-5 if dtype == jnp.float32 else 5e-2
    as_float32 = [x.astype(jnp.float32) for x in (q, k, v)]
    out = ours(q, k, v)
    assert out.dtype == dtype
    np.testing.assert_allclose(out.astype(jnp.float32), reference(*as_float32), atol=tolerance,
                               rtol=tolerance)
    cotangent = jax.random.normal(jax.random.key(14), q.shape)
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(ours(*a).astype(jnp.float32) * cotangent),
                             argnums=(0, 1, 2)))(q, k, v)
    expected = jax.grad(lambda *a: jnp.sum(reference(*a) * cotangent), argnums=(0, 1, 2))(
        *as_float32)
    for ours_grad, their_grad in zip(grads, expected):
        assert ours_grad.dtype == dtype
        np.testing.assert_allclose(ours_grad.astype(jnp.float32), their_grad, atol=2 * tolerance,
                                   rtol=2 * tolerance)


@pytest.mark.parametrize("offset,length,left,right,block,options", [
    (192, 64, 255, 0, None, {}),  # the last of 4 devices' blocks under a global layer
    (64, 64, 255, 0, 16, {}),  # a middle block: keys after the queries too (unseen, causal)
    # An offset and length that are not multiples of the block; Gemma 2's attention scale and
    # logit soft-cap (scores of order several against a cap of 2).
    (50, 37, 20, 9, 16, dict(scale=0.5, logit_soft_cap=2.0)),
])
def test_queries_at_an_offset_into_the_keys_equal_the_whole_sequences_rows(offset, length, left,
                                                                         right, block, options):
    """context_parallel's path for long halos: queries that are positions [offset, offset +
    length) of the keys' sequence give those rows of the whole sequence's attention (dense
    reference), forward and gradients, with a key mask, documents and grouped heads."""
    n = 256
    q = qkv((2, 4, n, 16), seed=21)[0]
    k, v = qkv((2, 2, n, 16), seed=22)[1:]
    mask = jax.random.bernoulli(jax.random.key(23), 0.9, (2, 1, n))
    segment_ids = jnp.cumsum(jax.random.bernoulli(jax.random.key(24), 0.02, (2, 1, n)), axis=-1)
    rows = slice(offset, offset + length)

    def ours(q_part, k, v):
        return xla_local_attention(q_part, k, v, mask, None, left, right, 0.0, None,
                                    segment_ids, block_size=block, precision=None,
                                    max_segments=None, query_offset=offset,
                                    **{"scale": None, "logit_soft_cap": None} | options)

    def reference(q_part, k, v):
        whole = q.at[:, :, rows].set(q_part)
        out = dense_local_attention(whole, jnp.repeat(k, 2, axis=1), jnp.repeat(v, 2, axis=1),
                                    left, right, mask=mask, segment_ids=segment_ids, **options)
        return out[:, :, rows]

    cotangent = jax.random.normal(jax.random.key(25), (2, 4, length, 16))
    value_and_grads = [jax.jit(jax.value_and_grad(
        lambda *a, f=f: jnp.sum(f(*a) * cotangent), argnums=(0, 1, 2))) for f in (ours,
                                                                              reference)]
    (value, grads), (expected, expected_grads) = (f(q[:, :, rows], k, v)
                                                  for f in value_and_grads)
    np.testing.assert_allclose(ours(q[:, :, rows], k, v), reference(q[:, :, rows], k, v),
                               atol=2e-5)
    assert value == pytest.approx(float(expected), rel=1e-5)
    for got, want in zip(grads, expected_grads, strict=True):
        np.testing.assert_allclose(got, want, atol=5e-5)
