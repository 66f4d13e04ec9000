"""Scanned and rematerialised layers (model/layer_stack.py): the same function and gradients as
plain layers, layer chunking, bfloat16 inputs saved as bits."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.transformer import TransformerLM
from tests.model.inputs import init_params, random_tokens, small_config, stacked_params


def test_scan_and_remat_compute_the_same_function():
    tokens = random_tokens()
    config = small_config(dropout_rate=0.1, attention_dropout_rate=0.1)
    params = init_params(config, tokens)
    rngs = {"dropout": jax.random.key(5)}

    def loss(config, params):
        return TransformerLM(config).apply({"params": params}, tokens, deterministic=False,
                                           rngs=rngs).mean()

    reference, reference_grad = jax.jit(jax.value_and_grad(functools.partial(loss, config)))(
        params)
    value, grad = jax.jit(jax.value_and_grad(functools.partial(loss, small_config(
        dropout_rate=0.1, attention_dropout_rate=0.1, remat=True))))(params)
    np.testing.assert_allclose(value, reference, rtol=1e-5, atol=1e-7)  # remat reorders sums
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(reference_grad)):
        np.testing.assert_allclose(a, b, atol=1e-6)

    # scan_layers stacks the layers' parameters on a leading "layers" axis.
    scanned_config = small_config(scan_layers=True, remat=True)
    unboxed = nn.unbox(params)
    layers = [unboxed[f"layer_{i}"] for i in range(config.num_layers)]
    scanned = {k: v for k, v in unboxed.items() if not k.startswith("layer_")}
    scanned["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    np.testing.assert_allclose(
        jax.jit(TransformerLM(scanned_config).apply)({"params": scanned}, tokens),
        jax.jit(TransformerLM(config).apply)({"params": unboxed}, tokens), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("layer_chunk_size", [0, 8, 10])
def test_rematerialised_chunked_layers_give_the_gradients_of_plain_layers(layer_chunk_size):
    """scan_layers + remat (inputs saved as bits, each layer recomputed chunk by chunk, with
    the window before each chunk) against unrolled layers without remat, on packed documents:
    the same losses and gradients to float32 rounding."""
    tokens, targets = random_tokens(length=40, seed=7), random_tokens(length=40, seed=8)
    segment_ids = jnp.where(jnp.arange(40) < 13, 1, 2)[None].repeat(2, 0)
    positions = jnp.where(jnp.arange(40) < 13, jnp.arange(40), jnp.arange(40) - 13)[None]
    plain = small_config(num_layers=3)
    remat = small_config(num_layers=3, scan_layers=True, remat=True,
                    layer_chunk_size=layer_chunk_size)
    params = nn.unbox(init_params(plain, tokens))
    weights = jax.random.uniform(jax.random.key(9), tokens.shape)
    kwargs = dict(segment_ids=segment_ids, positions=positions)

    def loss(config, params):
        return (TransformerLM(config).apply({"params": params}, tokens, targets=targets,
                                            **kwargs) * weights).sum()

    value, grad = jax.jit(jax.value_and_grad(functools.partial(loss, remat)))(
        stacked_params(params, 3))
    reference, reference_grad = jax.jit(jax.value_and_grad(functools.partial(loss, plain)))(
        params)
    np.testing.assert_allclose(value, reference, rtol=1e-5)
    reference_grad = stacked_params(reference_grad, 3)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grad),
                            jax.tree.leaves(reference_grad)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=str(path))


def test_layer_chunk_size_must_divide_the_sequence():
    config = small_config(scan_layers=True, remat=True, layer_chunk_size=16)
    tokens = random_tokens(length=40)
    params = init_params(config, tokens)
    with pytest.raises(ValueError, match="model.layer_chunk_size=16 does not divide the "
                                         "sequence length 40"):
        TransformerLM(config).apply({"params": params}, tokens, targets=tokens)


def test_bfloat16_rematerialised_chunked_model_trains_like_the_plain_one():
    """bfloat16 with the layer inputs saved as bits and chunked layers and losses: the loss
    equals the plain float32 model's to bfloat16 rounding, and a few SGD steps lower it."""
    tokens, targets = random_tokens(length=48, seed=10), random_tokens(length=48, seed=10)
    targets = jnp.roll(tokens, -1, axis=1)  # a learnable task: the next token
    plain = small_config(scan_layers=True)
    memory = small_config(scan_layers=True, remat=True, dtype="bfloat16", layer_chunk_size=16,
                     loss_chunk_size=12)
    params = nn.unbox(init_params(plain, tokens))

    def loss(config, params):
        return TransformerLM(config).apply({"params": params}, tokens, targets=targets).mean()

    np.testing.assert_allclose(loss(memory, params), loss(plain, params), rtol=2e-2)
    step = jax.jit(jax.value_and_grad(functools.partial(loss, memory)))
    first, _ = step(params)
    for _ in range(10):
        value, grad = step(params)
        params = jax.tree.map(lambda p, g: p - 0.5 * g, params, grad)
    assert np.isfinite(value) and value < 0.9 * first
