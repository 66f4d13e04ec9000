"""`local_attention` against jax.nn.dot_product_attention and a dense reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from model import local_attention
from model.attention import _packed_layout, _xla_local_attention, resolve_implementation
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


@pytest.mark.parametrize("window", [8, 16])  # the band schedule, the looped one (2·33 >= 64)
def test_dropout_is_deterministic_per_key_and_drops_the_requested_fraction(window):
    n, rate = 64, 0.3
    q, k, _ = _qkv((2, 2, n, n))
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
    q, k, v = _qkv((1, 2, 24, 4))
    key = jax.random.key(9)
    f = lambda q, k, v: local_attention(q, k, v, window_size_left=left, window_size_right=2,  # noqa: E731
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
    (dict(max_segments=0), "max_segments=0"),
    (dict(implementation="splash", mask=jnp.ones((10,), bool)), "'splash' cannot compute mask"),
    (dict(implementation="splash", dropout_rate=0.1, dropout_rng=jax.random.key(0)),
     "'splash' cannot compute dropout"),
])
def test_bad_arguments_raise_one_line_value_errors(bad, message):
    q, k, v = _qkv((2, 3, 10, 8))
    kwargs = dict(window_size_left=4, window_size_right=4) | bad
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")) as error:
        local_attention(q, k, v, **kwargs)
    assert "\n" not in str(error.value)


def test_mismatched_shapes_raise():
    q, k, _ = _qkv((2, 4, 10, 8))
    for bad in (k[..., :9, :], k[:, :3], k[:1]):  # length, kv heads not dividing, batch
        with pytest.raises(ValueError, match="kv_heads dividing heads") as error:
            local_attention(q, bad, bad)
        assert "\n" not in str(error.value)


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
    with pytest.raises(ValueError, match="implementation='cudnn' cannot compute "
                                         "window_size_right=3 .*segment_ids without max_segments"):
        local_attention(q, k, v, window_size_left=8, window_size_right=3,
                        segment_ids=jnp.zeros((1, 1, 64), jnp.int32), implementation="cudnn")
    with pytest.raises(ValueError, match="'cudnn' cannot compute rel_pos_emb, dropout"):
        local_attention(q, k, v, window_size_left=8, window_size_right=0,
                        rel_pos_emb=jnp.ones((9, 16)), dropout_rate=0.1,
                        dropout_rng=jax.random.key(0), implementation="cudnn")
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="implementation='cudnn' needs an NVIDIA GPU"):
            local_attention(q, k, v, window_size_left=8, window_size_right=0,
                            segment_ids=jnp.zeros((1, 1, 64), jnp.int32), max_segments=4,
                            implementation="cudnn")


@pytest.mark.parametrize("backend,dtype,features,expected", [
    ("cpu", jnp.bfloat16, {}, "xla"),
    ("gpu", jnp.bfloat16, {}, "cudnn"),
    ("gpu", jnp.bfloat16, dict(has_segment_ids=True, max_segments=8), "cudnn"),
    ("gpu", jnp.bfloat16, dict(has_segment_ids=True), "xla"),  # no bound for the layout
    ("gpu", jnp.float32, {}, "xla"),
    ("gpu", jnp.bfloat16, dict(window_size_right=2), "xla"),
    ("gpu", jnp.bfloat16, dict(has_rel_pos_emb=True), "xla"),
    ("tpu", jnp.float32, dict(has_segment_ids=True), "splash"),
    ("tpu", jnp.bfloat16, dict(window_size_right=5), "splash"),
    ("tpu", jnp.bfloat16, dict(has_mask=True), "xla"),
    ("tpu", jnp.bfloat16, dict(dropout_rate=0.1), "xla"),
])
def test_auto_picks_the_fastest_implementation_that_computes_the_call(backend, dtype, features,
                                                                      expected):
    assert resolve_implementation("auto", dtype, backend=backend, **features) == expected
    assert resolve_implementation("dense", dtype, backend=backend, **features) == "dense"


def test_auto_is_the_default_and_runs_xla_on_cpu():
    if jax.default_backend() != "cpu":
        pytest.skip("checks the CPU choice")
    q, k, v = _qkv((1, 2, 70, 8))
    np.testing.assert_array_equal(local_attention(q, k, v, window_size_left=9),
                                  local_attention(q, k, v, window_size_left=9,
                                                  implementation="xla"))


# Uneven documents, a padding run at the end, ids that come back after another document (runs,
# not ids, are documents) and unused slots (max_segments > documents).
_DOCUMENT_LENGTHS = ((50, 30, 120, 80, 20), (300,), (10, 290))


def _documents(lengths, total=300):
    rows = []
    for row in lengths:
        ids = np.concatenate([np.full(n, i % 3 + 1) for i, n in enumerate(row)])
        rows.append(np.pad(ids, (0, total - ids.size)))
    return jnp.asarray(np.stack(rows), jnp.int32)


def test_packed_layout_of_segment_ids_gives_the_attention_of_the_segments():
    """The offsets and lengths that cuDNN gets, turned into the mask that cuDNN's packed layout
    computes (a query sees the keys of its own packed sequence, causally, in the window),
    equal the segment-id semantics of the blocked kernel."""
    segment_ids = _documents(_DOCUMENT_LENGTHS)
    lengths, offsets = _packed_layout(segment_ids, max_segments=7)
    np.testing.assert_array_equal(lengths[0], [50, 30, 120, 80, 20, -1, -1])
    np.testing.assert_array_equal(offsets[0], [0, 50, 80, 200, 280, -1, -1, -1])
    np.testing.assert_array_equal(lengths[2], [10, 290, -1, -1, -1, -1, -1])
    position = np.arange(300)
    packed = np.full((3, 300), -1)
    for row in range(3):
        for slot, (offset, length) in enumerate(zip(np.asarray(offsets[row]),
                                                    np.asarray(lengths[row]))):
            if length > 0:
                packed[row, offset:offset + length] = slot
    assert (packed >= 0).all()
    q, k, v = _qkv((3, 2, 300, 16), seed=4)
    window = 40
    visible = ((packed[:, None, :, None] == packed[:, None, None, :])
               & (position[None, :] <= position[:, None])
               & (position[None, :] >= position[:, None] - window))
    cudnn_semantics = jax.nn.dot_product_attention(*(jnp.swapaxes(x, 1, 2) for x in (q, k, v)),
                                                   mask=jnp.asarray(visible))
    np.testing.assert_allclose(
        jnp.swapaxes(cudnn_semantics, 1, 2),
        local_attention(q, k, v, window_size_left=window, window_size_right=0,
                        segment_ids=segment_ids[:, None], implementation="xla"),
        atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("documents", [False, True])
@pytest.mark.parametrize("left,right", [(40, 0), (25, 9)])
def test_splash_matches_the_dense_reference(dtype, documents, left, right):
    """The splash kernel (Pallas interpret mode off TPUs): forward and gradients."""
    q, k, v = _qkv((3, 2, 300, 16), dtype, seed=5)
    segment_ids = _documents(_DOCUMENT_LENGTHS)[:, None] if documents else None

    def loss(function):
        cotangent = jax.random.normal(jax.random.key(6), q.shape)
        return lambda q, k, v: jnp.sum(function(q, k, v).astype(jnp.float32) * cotangent)

    splash = lambda q, k, v: local_attention(  # noqa: E731
        q, k, v, window_size_left=left, window_size_right=right, segment_ids=segment_ids,
        implementation="splash")
    reference = lambda q, k, v: dense_local_attention(  # noqa: E731
        q, k, v, left, right, segment_ids=segment_ids)
    tolerance = 2e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(splash(q, k, v).astype(np.float32),
                               reference(q, k, v).astype(np.float32),
                               atol=tolerance, rtol=tolerance)
    for got, expected in zip(jax.jit(jax.grad(loss(splash), argnums=(0, 1, 2)))(q, k, v),
                             jax.grad(loss(reference), argnums=(0, 1, 2))(q, k, v)):
        scale = float(jnp.abs(expected.astype(jnp.float32)).max())
        np.testing.assert_allclose(got.astype(np.float32), expected.astype(np.float32),
                                   atol=(5e-5 if dtype == jnp.float32 else 3e-2) * scale)


def _assert_matches_float32_xla(implementation, q, k, v, **kwargs):
    """bf16 ``implementation`` against the float32 blocked kernel: forward and gradients."""
    def loss(implementation, dtype):
        cotangent = jax.random.normal(jax.random.key(7), q.shape)
        return lambda q, k, v: jnp.sum(local_attention(
            q.astype(dtype), k.astype(dtype), v.astype(dtype), implementation=implementation,
            **kwargs).astype(jnp.float32) * cotangent)

    ours = jax.jit(jax.value_and_grad(loss(implementation, jnp.bfloat16), argnums=(0, 1, 2)))
    reference = jax.jit(jax.value_and_grad(loss("xla", jnp.float32), argnums=(0, 1, 2)))
    (_, got), (_, expected) = ours(q, k, v), reference(q, k, v)
    np.testing.assert_allclose(
        local_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), implementation=implementation,
                        **kwargs).astype(np.float32),
        local_attention(q, k, v, implementation="xla", **kwargs), atol=3e-2, rtol=3e-2)
    for got_grad, expected_grad in zip(got, expected):
        relative = float(jnp.linalg.norm(got_grad - expected_grad) / jnp.linalg.norm(expected_grad))
        assert relative < 1e-2, relative


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN needs an NVIDIA GPU")
def test_cudnn_implementation_matches_the_blocked_one_on_gpu():
    q, k, v = _qkv((2, 4, 1000, 64))
    _assert_matches_float32_xla("cudnn", q, k, v, window_size_left=100, window_size_right=0)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN needs an NVIDIA GPU")
def test_cudnn_packed_documents_match_the_blocked_kernel_on_gpu():
    """Uneven documents in a 32k row, three unused slots."""
    lengths = (5000, 3000, 12000, 8000, 4768)
    segment_ids = jnp.asarray(np.repeat(np.arange(1, 6), lengths), jnp.int32)[None, None]
    q, k, v = _qkv((1, 4, sum(lengths), 64))
    _assert_matches_float32_xla("cudnn", q, k, v, window_size_left=1024, window_size_right=0,
                                segment_ids=segment_ids, max_segments=8)
    assert resolve_implementation("auto", jnp.bfloat16, has_segment_ids=True,
                                  max_segments=8) == "cudnn"


@pytest.mark.parametrize("implementation", ["xla", "dense", "splash"])
@pytest.mark.parametrize("kv_heads", [2, 1])  # grouped-query (2 groups of 2), multi-query
def test_grouped_key_value_heads_equal_the_reference_with_repeated_keys(implementation, kv_heads):
    """Fewer key/value heads than query heads: the same output and gradients as the dense
    reference given k and v repeated per query head (the gradients of the repeats summed)."""
    heads, n, left = 4, 40 if implementation != "splash" else 130, 9
    q = _qkv((2, heads, n, 16), seed=5)[0]
    k, v = _qkv((2, kv_heads, n, 16), seed=6)[1:]
    keys = jax.random.split(jax.random.key(7), 3)
    segment_ids = jnp.cumsum(jax.random.bernoulli(keys[1], 0.05, (2, 1, n)), axis=-1)
    kwargs = dict(segment_ids=segment_ids)
    if implementation == "xla":  # every feature: a key mask and relative positions too
        kwargs["mask"] = jax.random.bernoulli(keys[0], 0.8, (2, 1, n))
        kwargs["rel_pos_emb"] = jax.random.normal(keys[2], (heads, left + 1, 16))
    repeat = lambda x: jnp.repeat(x, heads // kv_heads, axis=1)  # noqa: E731

    def ours(q, k, v):
        return local_attention(q, k, v, window_size_left=left, window_size_right=0,
                               implementation=implementation, **kwargs)

    def reference(q, k, v):
        return dense_local_attention(q, repeat(k), repeat(v), left, 0, **kwargs)

    np.testing.assert_allclose(ours(q, k, v), reference(q, k, v), atol=2e-5, rtol=2e-5)
    cotangent = jax.random.normal(jax.random.key(8), q.shape)
    grads = [jax.jit(jax.grad(lambda *a, f=f: jnp.sum(f(*a) * cotangent), argnums=(0, 1, 2)))(
        q, k, v) for f in (ours, reference)]
    for ours_grad, their_grad in zip(*grads):
        assert ours_grad.shape == their_grad.shape
        np.testing.assert_allclose(ours_grad, their_grad, atol=1e-4, rtol=1e-4)


def test_a_window_over_the_whole_sequence_is_causal_attention():
    """What a global layer runs: the blocked kernel with a window as long as the sequence
    equals jax's causal attention (forward and gradients), with grouped key/value heads."""
    q = _qkv((1, 4, 300, 8), seed=9)[0]
    k, v = _qkv((1, 2, 300, 8), seed=10)[1:]

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
    q = _qkv((2, 4, n, 16), seed=11)[0].astype(dtype)
    k, v = (x.astype(dtype) for x in _qkv((2, 2, n, 16), seed=12)[1:])
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


@pytest.mark.parametrize("offset,length,left,right,block", [
    (192, 64, 255, 0, None),  # the last of 4 devices' blocks under a global layer
    (64, 64, 255, 0, 16),  # a middle block: keys after the queries too (unseen, causal)
    (50, 37, 20, 9, 16),  # an offset and length that are not multiples of the block
])
def test_queries_at_an_offset_into_the_keys_equal_the_whole_sequences_rows(offset, length, left,
                                                                         right, block):
    """context_parallel's path for long halos: queries that are positions [offset, offset +
    length) of the keys' sequence give those rows of the whole sequence's attention (dense
    reference), forward and gradients, with a key mask, documents and grouped heads."""
    n = 256
    q = _qkv((2, 4, n, 16), seed=21)[0]
    k, v = _qkv((2, 2, n, 16), seed=22)[1:]
    mask = jax.random.bernoulli(jax.random.key(23), 0.9, (2, 1, n))
    segment_ids = jnp.cumsum(jax.random.bernoulli(jax.random.key(24), 0.02, (2, 1, n)), axis=-1)
    rows = slice(offset, offset + length)

    def ours(q_part, k, v):
        return _xla_local_attention(q_part, k, v, mask, None, left, right, 0.0, None,
                                    segment_ids, block_size=block, precision=None,
                                    max_segments=None, query_offset=offset)

    def reference(q_part, k, v):
        whole = q.at[:, :, rows].set(q_part)
        out = dense_local_attention(whole, jnp.repeat(k, 2, axis=1), jnp.repeat(v, 2, axis=1),
                                    left, right, mask=mask, segment_ids=segment_ids)
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


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN needs an NVIDIA GPU")
@pytest.mark.parametrize("left", [64, 1023])  # a window, and one over the whole sequence
def test_cudnn_grouped_key_value_heads_match_the_blocked_kernel_on_gpu(left):
    q = _qkv((2, 8, 1024, 64), jnp.bfloat16, seed=11)[0]
    k, v = _qkv((2, 2, 1024, 64), jnp.bfloat16, seed=12)[1:]
    run = lambda name: local_attention(q, k, v, window_size_left=left, window_size_right=0,  # noqa: E731
                                       implementation=name).astype(jnp.float32)
    np.testing.assert_allclose(run("cudnn"), run("xla"), atol=2e-2, rtol=2e-2)
