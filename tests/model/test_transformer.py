"""The causal LM (model/transformer.py): shapes, causality, receptive field, packing, chunked
losses, global layers."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.layer_stack import unstack_layers
from model.transformer import TransformerLM
from tests.model.inputs import (VOCAB, init_params, random_tokens, small_config,
                                stacked_params)


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(dtype="bfloat16", activation="gelu", norm="layernorm", tie_embeddings=False),
    dict(position_embedding="relative"),
    dict(position_embedding="none", scan_layers=True),
])
def test_shapes_dtypes_and_logical_axes(overrides):
    config = small_config(**overrides)
    tokens = random_tokens()
    variables = jax.jit(TransformerLM(config).init)(jax.random.key(1), tokens)
    logits = jax.jit(TransformerLM(config).apply)(variables, tokens)
    assert logits.shape == (2, 40, VOCAB) and logits.dtype == jnp.float32
    params = nn.unbox(variables["params"])
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))  # float32 master weights
    # Every parameter carries logical axis names for sharding rules.
    boxed = jax.tree.leaves(variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert boxed and all(isinstance(b, nn.LogicallyPartitioned) for b in boxed)
    names = {name for b in boxed for name in b.names if name}
    assert {"vocab", "embed", "heads", "kv", "mlp"} <= names


@pytest.mark.parametrize("position_embedding", ["rope", "relative", "none"])
def test_causal_and_receptive_field_is_layers_times_window(position_embedding):
    config = small_config(position_embedding=position_embedding, num_layers=3, window_size=4)
    tokens = random_tokens(batch=1, length=30)
    model, params = TransformerLM(config), init_params(config, tokens)
    logits = jax.jit(lambda t: model.apply({"params": params}, t))
    changed_at = 10
    base, changed = logits(tokens), logits(tokens.at[0, changed_at].set(
        (tokens[0, changed_at] + 1) % VOCAB))
    differs = np.abs(np.asarray(base - changed)).max(axis=-1)[0] > 0
    reach = changed_at + config.num_layers * config.window_size  # 3 layers × 4 positions
    assert not differs[:changed_at].any()  # causal
    assert differs[changed_at:reach + 1].all()
    assert not differs[reach + 1:].any()  # receptive field ends exactly there


def test_packed_documents_are_isolated():
    config = small_config()
    first, second = random_tokens(batch=1, length=17, seed=1), random_tokens(batch=1, length=23, seed=2)
    packed = jnp.concatenate([first, second], axis=1)
    segment_ids = jnp.concatenate([jnp.ones((1, 17), int), 2 * jnp.ones((1, 23), int)], axis=1)
    positions = jnp.concatenate([jnp.arange(17), jnp.arange(23)])[None]
    model, params = TransformerLM(config), init_params(config, packed)
    packed_logits = model.apply({"params": params}, packed, segment_ids=segment_ids,
                                positions=positions)
    for document, rows in ((first, slice(0, 17)), (second, slice(17, 40))):
        np.testing.assert_allclose(packed_logits[:, rows], model.apply({"params": params}, document),
                                   atol=2e-5, rtol=2e-5)


def _reference_losses(config, params, tokens, targets, **kwargs):
    """Per-token cross-entropy from the whole logits (what the chunked losses replace)."""
    import optax

    logits = TransformerLM(config).apply({"params": params}, tokens, **kwargs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets)


@pytest.mark.parametrize("overrides", [dict(loss_chunk_size=7), dict(loss_chunk_size=0),
                                       dict(loss_chunk_size=16, tie_embeddings=False)])
def test_chunked_losses_equal_the_whole_logits_losses_and_gradients(overrides):
    config = small_config(**overrides)
    tokens, targets = random_tokens(seed=3), random_tokens(seed=4)
    params = nn.unbox(init_params(config, tokens))
    weights = jax.random.uniform(jax.random.key(6), tokens.shape)  # distinct per-token cotangents

    def chunked(params):
        return TransformerLM(config).apply({"params": params}, tokens, targets=targets)

    def whole(params):
        return _reference_losses(config, params, tokens, targets)

    np.testing.assert_allclose(chunked(params), whole(params), rtol=1e-6, atol=1e-6)
    grad = jax.jit(jax.grad(lambda p: (chunked(p) * weights).sum()))(params)
    reference = jax.jit(jax.grad(lambda p: (whole(p) * weights).sum()))(params)
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(reference)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)  # sums in another order


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(scan_layers=True, remat=True, layer_chunk_size=16),  # local layers chunked, global whole
])
def test_global_layers_equal_dense_causal_attention_and_see_the_whole_context(overrides):
    """Layers 1 and 3 of 4 global (every 2nd), 2 key/value heads: the model equals the same
    parameters with jax's dense attention (a global layer: causal over the sequence), losses
    and gradients; the first token changes the last logits, far beyond layers × window."""
    config = small_config(num_layers=4, window_size=3, num_kv_heads=2, global_layers=2, **overrides)
    assert config.global_layer_indices == (1, 3)
    dense = dataclasses.replace(config, attention_implementation="dense", scan_layers=False,
                                remat=False, layer_chunk_size=0)
    tokens = random_tokens(batch=2, length=64)
    params = nn.unbox(init_params(config, tokens))
    dense_params = unstack_layers(params, config) if config.scan_layers else params

    def loss(config, params):
        return TransformerLM(config).apply({"params": params}, tokens, targets=tokens).mean()

    value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=1), static_argnums=0)
    value, grads = value_and_grad(config, params)
    dense_value, dense_grads = value_and_grad(dense, dense_params)
    assert value == pytest.approx(float(dense_value), rel=1e-5)
    if config.scan_layers:
        dense_grads = stacked_params(dense_grads, config.num_layers)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(dense_grads), strict=True):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-4)

    logits = jax.jit(lambda t: TransformerLM(config).apply({"params": params}, t))
    changed = tokens.at[:, 0].set((tokens[:, 0] + 1) % VOCAB)
    assert np.abs(logits(changed)[:, -1] - logits(tokens)[:, -1]).max() > 1e-4
    local = dataclasses.replace(config, global_layers=0)
    local_logits = jax.jit(lambda t: TransformerLM(local).apply({"params": params}, t))
    np.testing.assert_array_equal(local_logits(changed)[:, -1], local_logits(tokens)[:, -1])
