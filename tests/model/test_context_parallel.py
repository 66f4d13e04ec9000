"""Context parallelism (model/context_parallel.py): the sequence split over a mesh axis gives
the unsharded results, for the attention alone (against jax.nn.dot_product_attention) and for
the whole model's loss and gradients; no device holds the whole sequence."""

import dataclasses
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from model import TransformerConfig, TransformerLM
from model.context_parallel import context_parallel_attention
from tests.model.reference import dense_local_attention

RULES = tuple(default.get_config().logical_axis_rules)  # ("length", "context"), ...
AXES = ("data", "fsdp", "context", "tensor")


def _mesh(data=1, fsdp=1, context=1, tensor=1):
    shape = (data, fsdp, context, tensor)
    return jax.make_mesh(shape, AXES, (jax.sharding.AxisType.Auto,) * 4,
                         devices=jax.devices()[:np.prod(shape)])


def _in_mesh(mesh, function, *args):
    """``jax.jit(function)(*args)`` traced with ``mesh`` and the config's rules in scope."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        return jax.jit(function)(*args)


def _documents(batch, length, seed):
    """Segment ids ``(batch, length)`` of documents of 1 to 12 positions."""
    starts = np.random.default_rng(seed).random((batch, length)) < 0.15
    return jnp.asarray(np.cumsum(starts, axis=1), jnp.int32)


def _attention_inputs(batch=2, heads=2, length=64, head_dim=8, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 5)
    q, k, v, cotangent = (jax.random.normal(key, (batch, heads, length, head_dim))
                          for key in keys[:4])
    key_mask = jax.random.bernoulli(keys[4], 0.8, (batch, 1, length))
    segment_ids = _documents(batch, length, seed)[:, None, :]
    return q, k, v, cotangent, key_mask, segment_ids


def _dot_product_attention(q, k, v, key_mask, segment_ids, left, right):
    """jax.nn.dot_product_attention with the local window, in the (batch, heads, n, d) layout;
    zeros for a query that sees no key (jax would average all values)."""
    visible = key_mask[..., None, :] & (segment_ids[..., :, None] == segment_ids[..., None, :])
    to_bnhd = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
    out = to_bnhd(jax.nn.dot_product_attention(to_bnhd(q), to_bnhd(k), to_bnhd(v), mask=visible,
                                               local_window_size=(left, right)))
    key_minus_query = np.arange(q.shape[-2])[None, :] - np.arange(q.shape[-2])[:, None]
    band = (key_minus_query >= -left) & (key_minus_query <= right)
    return jnp.where((visible & band).any(-1)[..., None], out, 0.0)


@pytest.mark.parametrize("mesh_shape, left, right", [
    (dict(context=2), 5, 3),
    (dict(context=4), 16, 0),  # the window is one whole block
    (dict(context=8), 20, 9),  # blocks of 8: the halos come from 3 and 2 neighbours
    (dict(context=8), 100, 100),  # a window longer than the sequence
    (dict(data=2, context=2, tensor=2), 16, 16),
])
def test_attention_equals_dot_product_attention(mesh_shape, left, right):
    q, k, v, cotangent, key_mask, segment_ids = _attention_inputs()

    def loss(attention, q, k, v):
        out = attention(q, k, v, mask=key_mask, segment_ids=segment_ids, window_size_left=left,
                        window_size_right=right)
        return (out * cotangent).sum(), out

    def sharded(q, k, v):
        return jax.value_and_grad(lambda *x: loss(context_parallel_attention, *x),
                                  argnums=(0, 1, 2), has_aux=True)(q, k, v)

    def reference(q, k, v, mask, segment_ids, window_size_left, window_size_right):
        return _dot_product_attention(q, k, v, mask, segment_ids, window_size_left,
                                      window_size_right)

    (_, out), grads = _in_mesh(_mesh(**mesh_shape), sharded, q, k, v)
    (_, expected), expected_grads = jax.value_and_grad(
        lambda *x: loss(reference, *x), argnums=(0, 1, 2), has_aux=True)(q, k, v)
    np.testing.assert_allclose(out, expected, atol=2e-6)
    for got, want in zip(grads, expected_grads, strict=True):
        np.testing.assert_allclose(got, want, atol=2e-5)


@pytest.mark.parametrize("left, right, use_rel_pos_emb", [
    (10, 3, True),  # halos from two neighbours, the queries padded to them
    (63, 0, False),  # a global layer: the device's queries at their offset into the keys
])
def test_relative_positions_scale_and_soft_cap_equal_the_dense_reference(left, right,
                                                                          use_rel_pos_emb):
    """Gemma 2's attention scale and logit soft-cap (binding: scores of order several against
    a cap of 1.5) on both of the shards' paths, with a key mask and documents: forward and
    gradients against the dense reference, at context 8."""
    q, k, v, cotangent, key_mask, segment_ids = _attention_inputs(heads=4, seed=1)
    rel_pos_emb = jax.random.normal(jax.random.PRNGKey(7), (4, left + right + 1, 8))
    options = dict(scale=0.8, logit_soft_cap=1.5)

    def loss(attention, q, k, v, rel_pos_emb):
        return (attention(q, k, v, mask=key_mask, segment_ids=segment_ids,
                          rel_pos_emb=rel_pos_emb[None] if use_rel_pos_emb else None,
                          window_size_left=left, window_size_right=right,
                          **options) * cotangent).sum()

    def reference(q, k, v, mask, segment_ids, rel_pos_emb, window_size_left, window_size_right,
                  **options):
        return dense_local_attention(q, k, v, window_size_left, window_size_right, mask=mask,
                                     segment_ids=segment_ids, rel_pos_emb=rel_pos_emb, **options)

    grad = lambda attention: jax.value_and_grad(  # noqa: E731
        lambda *x: loss(attention, *x), argnums=(0, 1, 2, 3) if use_rel_pos_emb else (0, 1, 2))
    got = _in_mesh(_mesh(context=8), grad(context_parallel_attention), q, k, v, rel_pos_emb)
    want = grad(reference)(q, k, v, rel_pos_emb)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=3e-5)


def test_dropout_is_deterministic_and_the_sequence_must_divide():
    q, k, v, *_ = _attention_inputs()
    attention = lambda q, rng: context_parallel_attention(  # noqa: E731
        q, k[..., :q.shape[-2], :], v[..., :q.shape[-2], :], window_size_left=8,
        window_size_right=0, dropout_rate=0.5, dropout_rng=rng)
    mesh = _mesh(context=4)
    first = _in_mesh(mesh, attention, q, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(first, _in_mesh(mesh, attention, q, jax.random.PRNGKey(0)))
    assert not np.allclose(first, _in_mesh(mesh, attention, q, jax.random.PRNGKey(1)))
    with pytest.raises(ValueError, match=r"seq_len=62 is not divisible by mesh.context=4"):
        _in_mesh(mesh, attention, q[..., :62, :], jax.random.PRNGKey(0))


def _model_loss_and_grads(config, params, batch):
    def loss(params):
        logits = TransformerLM(config).apply({"params": params}, batch["inputs"],
                                             segment_ids=batch["segment_ids"],
                                             positions=batch["positions"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()
    return jax.value_and_grad(loss)(params)


def _model_case(length=96, **fields):
    config = TransformerConfig.from_config(dict(
        vocab_size=64, num_layers=2, d_model=32, num_heads=2, mlp_dim=64, window_size=12)
        | fields)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, length + 1), 0, 64)
    segment_ids = _documents(2, length, seed=3)
    starts = jnp.where(jnp.diff(segment_ids, axis=1, prepend=-1) != 0, jnp.arange(length), 0)
    positions = jnp.arange(length) - jax.lax.cummax(starts, axis=1)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segment_ids,
             "positions": positions}
    params = jax.jit(TransformerLM(config).init)(jax.random.PRNGKey(1), batch["inputs"])["params"]
    return config, nn.unbox(params), batch


@pytest.mark.parametrize("mesh_shape, fields", [
    (dict(context=4), dict(scan_layers=True, remat=True)),  # blocks of 24, window 12
    (dict(context=8), dict(remat=True)),  # blocks of 12: exactly one window
    (dict(data=2, context=2, tensor=2), dict(position_embedding="relative", scan_layers=True)),
    # Global layers: every earlier block's keys reach each device, its queries at their offset.
    (dict(context=4), dict(global_layers=2, num_kv_heads=1)),
    (dict(context=2, tensor=2), dict(global_layers=(0,), scan_layers=True, remat=True)),
    (dict(context=8), dict(global_layers=1)),  # every layer global
    # Splash (interpret mode) on each device's block: the halo's validity as segment ids.
    (dict(context=4), dict(attention_implementation="splash", scan_layers=True, remat=True)),
])
def test_model_loss_and_gradients_equal_the_unsharded_model(mesh_shape, fields):
    config, params, batch = _model_case(**fields)
    loss_and_grads = functools.partial(_model_loss_and_grads, config)
    loss, grads = _in_mesh(_mesh(**mesh_shape), loss_and_grads, params, batch)
    expected_loss, expected_grads = jax.jit(loss_and_grads)(params, batch)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("fields", [{}, {"layer_chunk_size": 12}])
def test_no_device_holds_the_whole_sequence(fields):
    """The compiled forward and backward pass at context 4: halos travel by collective-permute,
    and no array on a device has the sequence's length (96) as a dimension: nothing gathers
    the keys, the values or any activation along the sequence, with the layers chunked or
    not."""
    config, params, batch = _model_case(scan_layers=True, remat=True, **fields)
    mesh = _mesh(context=4)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "context"))
    batch = jax.device_put(batch, sharding)
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        hlo = jax.jit(functools.partial(_model_loss_and_grads, config)).lower(
            params, batch).compile().as_text()
    assert "collective-permute" in hlo
    dimensions = {int(d) for shape in re.findall(r"\[([\d,]+)\]", hlo)
                  for d in shape.split(",") if d}
    assert 24 in dimensions and 96 not in dimensions  # blocks of 24, never the whole 96


@pytest.mark.parametrize("mesh_shape, kv_heads", [
    (dict(context=2, tensor=2), 2),  # query and key/value heads split alike over tensor
    (dict(context=4, tensor=2), 1),  # one key/value head: heads stay whole on each device
])
def test_grouped_key_value_heads_equal_repeated_heads(mesh_shape, kv_heads):
    q, _, _, cotangent, key_mask, segment_ids = _attention_inputs(heads=4, seed=3)
    _, k, v, _, _, _ = _attention_inputs(heads=kv_heads, seed=4)
    repeat = lambda x: jnp.repeat(x, 4 // kv_heads, axis=1)  # noqa: E731

    def loss(q, k, v):
        out = context_parallel_attention(q, k, v, mask=key_mask, segment_ids=segment_ids,
                                         window_size_left=12, window_size_right=0)
        return (out * cotangent).sum(), out

    def reference(q, k, v):
        out = _dot_product_attention(q, repeat(k), repeat(v), key_mask, segment_ids, 12, 0)
        return (out * cotangent).sum(), out

    grad = functools.partial(jax.value_and_grad, argnums=(0, 1, 2), has_aux=True)
    (_, out), grads = _in_mesh(_mesh(**mesh_shape), grad(loss), q, k, v)
    (_, expected), expected_grads = grad(reference)(q, k, v)
    np.testing.assert_allclose(out, expected, atol=2e-6)
    for got, want in zip(grads, expected_grads, strict=True):
        np.testing.assert_allclose(got, want, atol=2e-5)


@pytest.mark.parametrize("implementation", ["xla", "splash"])
@pytest.mark.parametrize("context", [2, 4, 8])
def test_every_kernel_serves_the_shards_with_documents(implementation, context):
    """The halo's validity travels as segment ids, so splash (Pallas interpret mode here),
    which takes no mask, runs each device's block: the unsharded results, with documents."""
    q, k, v, cotangent, _, segment_ids = _attention_inputs(seed=5)
    left = 20

    def loss(attention, q, k, v, **options):
        out = attention(q, k, v, segment_ids=segment_ids, window_size_left=left,
                        window_size_right=0, **options)
        return (out * cotangent).sum(), out

    def sharded(q, k, v):
        return jax.value_and_grad(
            lambda *x: loss(context_parallel_attention, *x, implementation=implementation,
                            max_segments=64), argnums=(0, 1, 2), has_aux=True)(q, k, v)

    (_, out), grads = _in_mesh(_mesh(context=context), sharded, q, k, v)
    ones = jnp.ones(q.shape[:1] + (1, q.shape[-2]), bool)
    (_, expected), expected_grads = jax.value_and_grad(
        lambda *x: loss(lambda q, k, v, **o: _dot_product_attention(
            q, k, v, ones, o["segment_ids"], o["window_size_left"], 0), *x),
        argnums=(0, 1, 2), has_aux=True)(q, k, v)
    np.testing.assert_allclose(out, expected, atol=2e-6)
    for got, want in zip(grads, expected_grads, strict=True):
        np.testing.assert_allclose(got, want, atol=2e-5)


@pytest.mark.parametrize("mesh_shape, fields", [
    # Blocks of 24 in chunks of 12, window 12: the halo is one chunk.
    (dict(context=4), dict(layer_chunk_size=12)),
    # Blocks of 48 in chunks of 16, a global layer (run whole), one key/value head, the batch
    # over data as well.
    (dict(data=2, context=2), dict(layer_chunk_size=16, global_layers=(1,), num_kv_heads=1)),
    # Splash (interpret mode) on the rows, heads over tensor; a window of 5 in chunks of 8.
    (dict(context=2, tensor=2), dict(layer_chunk_size=8, window_size=5,
                                     attention_implementation="splash")),
])
def test_chunked_layers_under_context_parallelism_equal_the_unsharded_model(mesh_shape, fields):
    """Each device runs its block in chunks, with the window before the block from the
    previous device: the unsharded model's loss and gradients."""
    config, params, batch = _model_case(scan_layers=True, remat=True, **fields)
    loss_and_grads = functools.partial(_model_loss_and_grads, config)
    loss, grads = _in_mesh(_mesh(**mesh_shape), loss_and_grads, params, batch)
    unchunked = dataclasses.replace(config, layer_chunk_size=0)
    expected_loss, expected_grads = jax.jit(functools.partial(_model_loss_and_grads, unchunked))(
        params, batch)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
