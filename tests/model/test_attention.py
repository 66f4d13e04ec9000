"""`local_attention`, the public entry: its semantics against a dense reference, its argument
checks and its choice of implementation (model/attention.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import local_attention
from model.attention import resolve_implementation
from tests.model.inputs import qkv
from tests.model.reference import dense_local_attention


def test_query_without_visible_keys_gives_zeros_and_finite_gradients():
    q, k, v = qkv((1, 1, 40, 8))
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
    q, k, v = qkv((2, 2, 33, 8))
    out = local_attention(q, k, v, window_size_left=0, window_size_right=0)
    np.testing.assert_allclose(out, v, atol=1e-6)


def test_rel_pos_emb_shared_across_heads_and_longer_than_sequence():
    q, k, v = qkv((2, 3, 20, 8))
    rel = jax.random.normal(jax.random.key(5), (64 + 32 + 1, 8))
    ours = local_attention(q, k, v, rel_pos_emb=rel, window_size_left=64, window_size_right=32)
    reference = dense_local_attention(q, k, v, 64, 32, rel_pos_emb=rel)
    np.testing.assert_allclose(ours, reference, atol=2e-5, rtol=2e-5)


def test_bfloat16_within_tolerance_of_float32():
    q, k, v = qkv((2, 2, 200, 32))
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
    (dict(scale=0.0), "scale=0.0"),
    (dict(logit_soft_cap=float("inf")), "logit_soft_cap=inf"),
    (dict(logit_soft_cap=-50), "logit_soft_cap=-50"),
    (dict(implementation="splash", mask=jnp.ones((10,), bool)), "'splash' cannot compute mask"),
    (dict(implementation="splash", dropout_rate=0.1, dropout_rng=jax.random.key(0)),
     "'splash' cannot compute dropout"),
])
def test_bad_arguments_raise_one_line_value_errors(bad, message):
    q, k, v = qkv((2, 3, 10, 8))
    kwargs = dict(window_size_left=4, window_size_right=4) | bad
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")) as error:
        local_attention(q, k, v, **kwargs)
    assert "\n" not in str(error.value)


def test_mismatched_shapes_raise():
    q, k, _ = qkv((2, 4, 10, 8))
    for bad in (k[..., :9, :], k[:, :3], k[:1]):  # length, kv heads not dividing, batch
        with pytest.raises(ValueError, match="kv_heads dividing heads") as error:
            local_attention(q, bad, bad)
        assert "\n" not in str(error.value)


@pytest.mark.parametrize("backend,dtype,features,expected", [
    ("cpu", jnp.bfloat16, {}, "xla"),
    ("gpu", jnp.bfloat16, {}, "cudnn"),
    ("gpu", jnp.bfloat16, dict(has_segment_ids=True, max_segments=8), "cudnn"),
    ("gpu", jnp.bfloat16, dict(has_segment_ids=True), "xla"),  # no bound for the layout
    ("gpu", jnp.float32, {}, "xla"),
    ("gpu", jnp.bfloat16, dict(window_size_right=2), "xla"),
    ("gpu", jnp.bfloat16, dict(has_rel_pos_emb=True), "xla"),
    ("gpu", jnp.bfloat16, dict(has_logit_soft_cap=True), "xla"),  # cuDNN cannot cap
    ("tpu", jnp.float32, dict(has_segment_ids=True), "splash"),
    ("tpu", jnp.bfloat16, dict(window_size_right=5), "splash"),
    ("tpu", jnp.bfloat16, dict(has_mask=True), "xla"),
    ("tpu", jnp.bfloat16, dict(dropout_rate=0.1), "xla"),
    ("tpu", jnp.bfloat16, dict(has_logit_soft_cap=True), "splash"),
])
def test_auto_picks_the_fastest_implementation_that_computes_the_call(backend, dtype, features,
                                                                      expected):
    assert resolve_implementation("auto", dtype, backend=backend, **features) == expected
    assert resolve_implementation("dense", dtype, backend=backend, **features) == "dense"


def test_auto_is_the_default_and_runs_xla_on_cpu():
    if jax.default_backend() != "cpu":
        pytest.skip("checks the CPU choice")
    q, k, v = qkv((1, 2, 70, 8))
    np.testing.assert_array_equal(local_attention(q, k, v, window_size_left=9),
                                  local_attention(q, k, v, window_size_left=9,
                                                  implementation="xla"))


@pytest.mark.parametrize("implementation", ["xla", "dense", "splash"])
# Grouped-query (2 groups of 2); multi-query with Gemma 2's attention scale and logit soft-cap,
# which binds (scores of order several against a cap of 2).
@pytest.mark.parametrize("kv_heads,options", [(2, {}), (1, dict(scale=0.6, logit_soft_cap=2.0))])
def test_grouped_key_value_heads_equal_the_reference_with_repeated_keys(implementation, kv_heads,
                                                                       options):
    """Fewer key/value heads than query heads: the same output and gradients as the dense
    reference given k and v repeated per query head (the gradients of the repeats summed);
    every kernel with a scale and a soft-cap too."""
    heads, n, left = 4, 40 if implementation != "splash" else 130, 9
    q = qkv((2, heads, n, 16), seed=5)[0]
    k, v = qkv((2, kv_heads, n, 16), seed=6)[1:]
    keys = jax.random.split(jax.random.key(7), 3)
    segment_ids = jnp.cumsum(jax.random.bernoulli(keys[1], 0.05, (2, 1, n)), axis=-1)
    kwargs = dict(segment_ids=segment_ids, **options)
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
