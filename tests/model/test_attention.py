"""`local_attention` against jax.nn.dot_product_attention and a dense reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from model import local_attention
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


def _qkv(shape, dtype=jnp.float32, seed=0):
    return [jax.random.normal(key, shape, dtype) for key in jax.random.split(jax.random.key(seed), 3)]


def _jax_reference(q, k, v, left, right, mask=None):
    """jax.nn.dot_product_attention in its (batch, seq, heads, dim) layout."""
    swap = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
    out = jax.nn.dot_product_attention(swap(q), swap(k), swap(v), mask=mask,
                                       local_window_size=(left, right))
    return swap(out)


@pytest.mark.parametrize("batch,heads,n,d,left,right,block", CASES)
def test_matches_jax_dot_product_attention_forward_and_gradients(
        batch, heads, n, d, left, right, block):
    q, k, v = _qkv((batch, heads, n, d))
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
    q, k, v = _qkv((batch, heads, n, d), seed=2)
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


def test_query_without_visible_keys_gives_zeros_and_finite_gradients():
    q, k, v = _qkv((1, 1, 40, 8))
    mask = jnp.arange(40) >= 20  # queries 0..9 see only keys 0..(i+right) < 20: all masked
    f = lambda q, k, v: local_attention(q, k, v, mask=mask, window_size_left=4,  # noqa: E731
                                        window_size_right=2)
    out = f(q, k, v)
    np.testing.assert_array_equal(out[..., :10, :], 0.0)
    assert bool(jnp.all(jnp.abs(out[..., 22:, :]) > 0))
    grads = jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1, 2))(q, k, v)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)


def test_causal_window_includes_the_query_itself():
    # window_size_right=0, window_size_left=0: each query sees only itself, so out == v.
    q, k, v = _qkv((2, 2, 33, 8))
    out = local_attention(q, k, v, window_size_left=0, window_size_right=0)
    np.testing.assert_allclose(out, v, atol=1e-6)


def test_rel_pos_emb_shared_across_heads_and_longer_than_sequence():
    q, k, v = _qkv((2, 3, 20, 8))
    rel = jax.random.normal(jax.random.key(5), (64 + 32 + 1, 8))
    ours = local_attention(q, k, v, rel_pos_emb=rel, window_size_left=64, window_size_right=32)
    reference = dense_local_attention(q, k, v, 64, 32, rel_pos_emb=rel)
    np.testing.assert_allclose(ours, reference, atol=2e-5, rtol=2e-5)


def test_dropout_is_deterministic_per_key_and_drops_the_requested_fraction():
    n, rate = 64, 0.3
    q, k, _ = _qkv((2, 2, n, n))
    # With v = identity the output row i is the (dropped, rescaled) attention weights of i.
    v = jnp.broadcast_to(jnp.eye(n), q.shape)
    kwargs = dict(window_size_left=16, window_size_right=16, block_size=16)
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


def test_dropout_gradients_match_finite_differences():
    q, k, v = _qkv((1, 2, 24, 4))
    key = jax.random.key(9)
    f = lambda q, k, v: local_attention(q, k, v, window_size_left=5, window_size_right=2,  # noqa: E731
                                        dropout_rate=0.2, dropout_rng=key, block_size=8)
    check_grads(f, (q, k, v), order=1, modes=["rev"], atol=2e-2, rtol=2e-2)


def test_bfloat16_within_tolerance_of_float32():
    q, k, v = _qkv((2, 2, 200, 32))
    rel = jax.random.normal(jax.random.key(6), (2, 48, 32))
    f = lambda q, k, v, rel: local_attention(q, k, v, rel_pos_emb=rel, window_size_left=40,  # noqa: E731
                                             window_size_right=7)
    bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v, rel)]
    out = f(*bf16)
    assert out.dtype == jnp.bfloat16
    # bfloat16 keeps 8 significant bits: inputs are rounded by 2**-9 relative, and outputs
    # (averages of unit-variance values) land within 2e-2 of the float32 result.
    np.testing.assert_allclose(out.astype(jnp.float32), f(*[x.astype(jnp.float32) for x in bf16]),
                               atol=2e-2, rtol=2e-2)
    grads = jax.grad(lambda *a: f(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2, 3))(*bf16)
    reference = jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1, 2, 3))(
        *[x.astype(jnp.float32) for x in bf16])
    for g, r in zip(grads, reference):
        assert g.dtype == jnp.bfloat16
        np.testing.assert_allclose(g.astype(jnp.float32), r, atol=5e-2, rtol=5e-2)


def test_memory_is_linear_in_sequence_length():
    # A dense (n, n) score matrix at n = 16384 with 4 heads would take 4 GiB; the blocked
    # kernel's forward+backward needs O(n·d) plus one chunk.
    n, heads, d = 16384, 4, 64
    spec = jax.ShapeDtypeStruct((1, heads, n, d), jnp.float32)
    grad = jax.jit(jax.grad(lambda q, k, v: local_attention(
        q, k, v, window_size_left=256, window_size_right=0).sum(), argnums=(0, 1, 2)))
    temp_bytes = grad.lower(spec, spec, spec).compile().memory_analysis().temp_size_in_bytes
    inputs_bytes = heads * n * d * 4
    assert temp_bytes < 24 * inputs_bytes, temp_bytes


@pytest.mark.parametrize("bad,message", [
    (dict(window_size_left=-1), "window_size_left=-1"),
    (dict(window_size_right=2.5), "window_size_right=2.5"),
    (dict(dropout_rate=0.1), "needs a dropout_rng"),
    (dict(dropout_rate=1.0, dropout_rng=jax.random.key(0)), "dropout_rate=1.0"),
    (dict(mask=jnp.ones((2, 3, 9), bool)), "mask has shape"),
    (dict(segment_ids=jnp.ones((5, 10), int)), "segment_ids has shape"),
    (dict(rel_pos_emb=jnp.ones((7, 8))), "rel_pos_emb has shape"),
    (dict(implementation="pallas"), "implementation='pallas'"),
    (dict(block_size=0), "block_size=0"),
])
def test_bad_arguments_raise_one_line_value_errors(bad, message):
    q, k, v = _qkv((2, 3, 10, 8))
    kwargs = dict(window_size_left=4, window_size_right=4) | bad
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")) as error:
        local_attention(q, k, v, **kwargs)
    assert "\n" not in str(error.value)


def test_mismatched_shapes_raise():
    q, k, _ = _qkv((2, 3, 10, 8))
    with pytest.raises(ValueError, match="same shape"):
        local_attention(q, k[..., :9, :], k[..., :9, :])


@pytest.mark.parametrize("with_masks", [False, True])
def test_dense_implementation_matches_the_blocked_one(with_masks):
    q, k, v = _qkv((2, 2, 90, 8))
    kwargs = dict(window_size_left=12, window_size_right=3)
    if with_masks:
        kwargs |= dict(mask=jnp.arange(90) % 7 != 0,
                       segment_ids=jnp.repeat(jnp.arange(3), 30)[None, None])
    np.testing.assert_allclose(local_attention(q, k, v, implementation="dense", **kwargs),
                               local_attention(q, k, v, **kwargs), atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="implementation='dense' supports neither"):
        local_attention(q, k, v, implementation="dense", rel_pos_emb=jnp.ones((16, 8)), **kwargs)


def test_cudnn_implementation_rejects_what_it_cannot_compute():
    q, k, v = _qkv((1, 2, 64, 16), jnp.bfloat16)
    with pytest.raises(ValueError, match="implementation='cudnn' computes causal windows .* "
                                         "segment_ids, window_size_right=3"):
        local_attention(q, k, v, window_size_left=8, window_size_right=3,
                        segment_ids=jnp.zeros((1, 1, 64), jnp.int32), implementation="cudnn")
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="implementation='cudnn' needs an NVIDIA GPU"):
            local_attention(q, k, v, window_size_left=8, window_size_right=0,
                            implementation="cudnn")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN needs an NVIDIA GPU")
def test_cudnn_implementation_matches_the_blocked_one_on_gpu():
    q, k, v = _qkv((2, 4, 1000, 64), jnp.bfloat16)
    kwargs = dict(window_size_left=100, window_size_right=0)

    def loss(implementation):
        return lambda q, k, v: (local_attention(q, k, v, implementation=implementation, **kwargs)
                                .astype(jnp.float32) ** 2).sum()

    for implementation in ("cudnn", "xla"):
        jax.block_until_ready(local_attention(q, k, v, implementation=implementation, **kwargs))
    np.testing.assert_allclose(
        local_attention(q, k, v, implementation="cudnn", **kwargs).astype(np.float32),
        local_attention(q, k, v, **kwargs).astype(np.float32), atol=2e-2, rtol=2e-2)
    for got, expected in zip(jax.grad(loss("cudnn"), argnums=(0, 1, 2))(q, k, v),
                             jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)):
        scale = float(jnp.abs(expected.astype(jnp.float32)).max())
        np.testing.assert_allclose(got.astype(np.float32), expected.astype(np.float32),
                                   atol=3e-2 * scale)
