"""The causal LM: shapes, causality, receptive field, packing, layer variants, FLOP estimate."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.transformer import (TransformerConfig, TransformerLM, count_parameters,
                               training_flops_per_token, unstack_layers)

VOCAB = 300


def _config(**overrides) -> TransformerConfig:
    base = dict(vocab_size=VOCAB, num_layers=2, d_model=32, num_heads=4, mlp_dim=64,
                window_size=4)
    return TransformerConfig.from_config(base, **overrides)


def _tokens(batch=2, length=40, seed=0):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, VOCAB)


def _init(config, tokens):
    return TransformerLM(config).init(jax.random.key(1), tokens)["params"]


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(dtype="bfloat16", activation="gelu", norm="layernorm", tie_embeddings=False),
    dict(position_embedding="relative"),
    dict(position_embedding="none", scan_layers=True),
])
def test_shapes_dtypes_and_logical_axes(overrides):
    config = _config(**overrides)
    tokens = _tokens()
    variables = TransformerLM(config).init(jax.random.key(1), tokens)
    logits = TransformerLM(config).apply(variables, tokens)
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
    config = _config(position_embedding=position_embedding, num_layers=3, window_size=4)
    tokens = _tokens(batch=1, length=30)
    model, params = TransformerLM(config), _init(config, tokens)
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
    config = _config()
    first, second = _tokens(batch=1, length=17, seed=1), _tokens(batch=1, length=23, seed=2)
    packed = jnp.concatenate([first, second], axis=1)
    segment_ids = jnp.concatenate([jnp.ones((1, 17), int), 2 * jnp.ones((1, 23), int)], axis=1)
    positions = jnp.concatenate([jnp.arange(17), jnp.arange(23)])[None]
    model, params = TransformerLM(config), _init(config, packed)
    packed_logits = model.apply({"params": params}, packed, segment_ids=segment_ids,
                                positions=positions)
    for document, rows in ((first, slice(0, 17)), (second, slice(17, 40))):
        np.testing.assert_allclose(packed_logits[:, rows], model.apply({"params": params}, document),
                                   atol=2e-5, rtol=2e-5)


def test_scan_and_remat_compute_the_same_function():
    tokens = _tokens()
    config = _config(dropout_rate=0.1, attention_dropout_rate=0.1)
    params = _init(config, tokens)
    rngs = {"dropout": jax.random.key(5)}

    def loss(config, params):
        return TransformerLM(config).apply({"params": params}, tokens, deterministic=False,
                                           rngs=rngs).mean()

    reference, reference_grad = jax.jit(jax.value_and_grad(functools.partial(loss, config)))(
        params)
    value, grad = jax.jit(jax.value_and_grad(functools.partial(loss, _config(
        dropout_rate=0.1, attention_dropout_rate=0.1, remat=True))))(params)
    np.testing.assert_allclose(value, reference, rtol=1e-5, atol=1e-7)  # remat reorders sums
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(reference_grad)):
        np.testing.assert_allclose(a, b, atol=1e-6)

    # scan_layers stacks the layers' parameters on a leading "layers" axis.
    scanned_config = _config(scan_layers=True, remat=True)
    unboxed = nn.unbox(params)
    layers = [unboxed[f"layer_{i}"] for i in range(config.num_layers)]
    scanned = {k: v for k, v in unboxed.items() if not k.startswith("layer_")}
    scanned["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    np.testing.assert_allclose(
        TransformerLM(scanned_config).apply({"params": scanned}, tokens),
        TransformerLM(config).apply({"params": unboxed}, tokens), atol=2e-5, rtol=2e-5)


def _stacked(params, num_layers):
    """Unrolled parameters (``layer_i``) as the scanned model's (``layers``, stacked)."""
    unboxed = nn.unbox(params)
    scanned = {k: v for k, v in unboxed.items() if not k.startswith("layer_")}
    scanned["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs),
                                     *[unboxed[f"layer_{i}"] for i in range(num_layers)])
    return scanned


def _reference_losses(config, params, tokens, targets, **kwargs):
    """Per-token cross-entropy from the whole logits (what the chunked losses replace)."""
    import optax

    logits = TransformerLM(config).apply({"params": params}, tokens, **kwargs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets)


@pytest.mark.parametrize("overrides", [dict(loss_chunk_size=7), dict(loss_chunk_size=0),
                                       dict(loss_chunk_size=16, tie_embeddings=False)])
def test_chunked_losses_equal_the_whole_logits_losses_and_gradients(overrides):
    config = _config(**overrides)
    tokens, targets = _tokens(seed=3), _tokens(seed=4)
    params = nn.unbox(_init(config, tokens))
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


@pytest.mark.parametrize("layer_chunk_size", [0, 8, 10])
def test_rematerialised_chunked_layers_give_the_gradients_of_plain_layers(layer_chunk_size):
    """scan_layers + remat (inputs saved as bits, each layer recomputed chunk by chunk, with
    the window before each chunk) against unrolled layers without remat, on packed documents:
    the same losses and gradients to float32 rounding."""
    tokens, targets = _tokens(length=40, seed=7), _tokens(length=40, seed=8)
    segment_ids = jnp.where(jnp.arange(40) < 13, 1, 2)[None].repeat(2, 0)
    positions = jnp.where(jnp.arange(40) < 13, jnp.arange(40), jnp.arange(40) - 13)[None]
    plain = _config(num_layers=3)
    remat = _config(num_layers=3, scan_layers=True, remat=True,
                    layer_chunk_size=layer_chunk_size)
    params = nn.unbox(_init(plain, tokens))
    weights = jax.random.uniform(jax.random.key(9), tokens.shape)
    kwargs = dict(segment_ids=segment_ids, positions=positions)

    def loss(config, params):
        return (TransformerLM(config).apply({"params": params}, tokens, targets=targets,
                                            **kwargs) * weights).sum()

    value, grad = jax.jit(jax.value_and_grad(functools.partial(loss, remat)))(
        _stacked(params, 3))
    reference, reference_grad = jax.jit(jax.value_and_grad(functools.partial(loss, plain)))(
        params)
    np.testing.assert_allclose(value, reference, rtol=1e-5)
    reference_grad = _stacked(reference_grad, 3)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grad),
                            jax.tree.leaves(reference_grad)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=str(path))


def test_layer_chunk_size_must_divide_the_sequence():
    config = _config(scan_layers=True, remat=True, layer_chunk_size=16)
    tokens = _tokens(length=40)
    params = _init(config, tokens)
    with pytest.raises(ValueError, match="model.layer_chunk_size=16 does not divide the "
                                         "sequence length 40"):
        TransformerLM(config).apply({"params": params}, tokens, targets=tokens)


def test_bfloat16_rematerialised_chunked_model_trains_like_the_plain_one():
    """bfloat16 with the layer inputs saved as bits and chunked layers and losses: the loss
    equals the plain float32 model's to bfloat16 rounding, and a few SGD steps lower it."""
    tokens, targets = _tokens(length=48, seed=10), _tokens(length=48, seed=10)
    targets = jnp.roll(tokens, -1, axis=1)  # a learnable task: the next token
    plain = _config(scan_layers=True)
    memory = _config(scan_layers=True, remat=True, dtype="bfloat16", layer_chunk_size=16,
                     loss_chunk_size=12)
    params = nn.unbox(_init(plain, tokens))

    def loss(config, params):
        return TransformerLM(config).apply({"params": params}, tokens, targets=targets).mean()

    np.testing.assert_allclose(loss(memory, params), loss(plain, params), rtol=2e-2)
    step = jax.jit(jax.value_and_grad(functools.partial(loss, memory)))
    first, _ = step(params)
    for _ in range(10):
        value, grad = step(params)
        params = jax.tree.map(lambda p, g: p - 0.5 * g, params, grad)
    assert np.isfinite(value) and value < 0.9 * first


def test_parameter_count_and_flops_estimate_match_xla():
    config = _config(num_layers=2, d_model=128, num_heads=4, mlp_dim=256, window_size=0,
                     vocab_size=512)
    tokens = _tokens(batch=1, length=64) % 512
    model, params = TransformerLM(config), nn.unbox(_init(config, tokens))
    per_layer = 4 * 128 * 128 + 3 * 128 * 256 + 2 * 128  # q k v out, swiglu, two RMSNorm scales
    assert count_parameters(params) == 2 * per_layer + 512 * 128 + 128
    step = jax.jit(jax.grad(lambda p: model.apply({"params": p}, tokens).sum()))
    xla_flops = step.lower(params).compile().cost_analysis()["flops"]
    estimate = training_flops_per_token(config, 64) * 64
    # XLA also counts elementwise work and the blocked kernel's masked scores.
    assert 0.9 < xla_flops / estimate < 1.35, (xla_flops, estimate)


@pytest.mark.parametrize("field,value,message", [
    ("num_heads", 0, "model.num_heads=0: expected a positive int"),
    ("d_model", 30, "model.d_model=30 is not divisible by model.num_heads=4"),
    ("activation", "relu", "model.activation='relu': expected one of"),
    ("window_size", -1, "model.window_size=-1"),
    ("layer_chunk_size", -8, "model.layer_chunk_size=-8: expected an int >= 0"),
    ("loss_chunk_size", 1.5, "model.loss_chunk_size=1.5: expected an int >= 0"),
    ("unknown_field", 1, "model.unknown_field: unknown model config field"),
    ("head_dim", 0, "model.head_dim=0: expected a positive int or None"),
    ("dropout_rate", "0.1", "model.dropout_rate='0.1': expected a number"),
    ("attention_implementation", "flash", "model.attention_implementation='flash'"),
    ("rope_base", 1.0, "model.rope_base=1.0"),
    ("num_kv_heads", 3, "model.num_kv_heads=3: expected None or a positive divisor"),
    ("global_layers", 5, "model.global_layers=5: expected an int k in 0..2"),
    ("global_layers", (0, 0), "model.global_layers=(0, 0): expected an int k"),
    ("global_layers", (2,), "model.global_layers=(2,): expected an int k"),
])
def test_bad_config_values_raise_one_line_errors(field, value, message):
    with pytest.raises(ValueError) as error:
        _config(**{field: value})
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_missing_vocab_size_and_unsupported_combinations():
    with pytest.raises(ValueError, match="model.vocab_size is missing"):
        TransformerConfig.from_config(dict(num_layers=2))
    with pytest.raises(ValueError, match="supports neither relative positions"):
        _config(attention_implementation="dense", position_embedding="relative")


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(scan_layers=True, remat=True, layer_chunk_size=16),  # local layers chunked, global whole
])
def test_global_layers_equal_dense_causal_attention_and_see_the_whole_context(overrides):
    """Layers 1 and 3 of 4 global (every 2nd), 2 key/value heads: the model equals the same
    parameters with jax's dense attention (a global layer: causal over the sequence), losses
    and gradients; the first token changes the last logits, far beyond layers × window."""
    config = _config(num_layers=4, window_size=3, num_kv_heads=2, global_layers=2, **overrides)
    assert config.global_layer_indices == (1, 3)
    dense = dataclasses.replace(config, attention_implementation="dense", scan_layers=False,
                                remat=False, layer_chunk_size=0)
    tokens = _tokens(batch=2, length=64)
    params = nn.unbox(_init(config, tokens))
    dense_params = unstack_layers(params, config) if config.scan_layers else params

    def loss(config, params):
        return TransformerLM(config).apply({"params": params}, tokens, targets=tokens).mean()

    value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=1), static_argnums=0)
    value, grads = value_and_grad(config, params)
    dense_value, dense_grads = value_and_grad(dense, dense_params)
    assert value == pytest.approx(float(dense_value), rel=1e-5)
    if config.scan_layers:
        dense_grads = _stacked(dense_grads, config.num_layers)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(dense_grads), strict=True):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-4)

    logits = jax.jit(lambda t: TransformerLM(config).apply({"params": params}, t))
    changed = tokens.at[:, 0].set((tokens[:, 0] + 1) % VOCAB)
    assert np.abs(logits(changed)[:, -1] - logits(tokens)[:, -1]).max() > 1e-4
    local = dataclasses.replace(config, global_layers=0)
    local_logits = jax.jit(lambda t: TransformerLM(local).apply({"params": params}, t))
    np.testing.assert_array_equal(local_logits(changed)[:, -1], local_logits(tokens)[:, -1])


def test_flops_count_global_layers_and_fewer_key_value_heads():
    base = _config(num_layers=4, d_model=128, num_heads=4, mlp_dim=256, window_size=63)
    grouped = dataclasses.replace(base, num_kv_heads=1)
    # The k and v projections shrink by 4: 2 * 128 * (128 - 32) weights, 6 FLOPs each.
    assert training_flops_per_token(base, 1024) - training_flops_per_token(grouped, 1024) == \
        6 * 4 * 2 * 128 * 96
    with_global = dataclasses.replace(base, global_layers=(3,))
    # One layer's keys go from window + 1 = 64 to (1024 + 1) / 2 on average.
    assert training_flops_per_token(with_global, 1024) - training_flops_per_token(base, 1024) \
        == pytest.approx(12 * 128 * (1025 / 2 - 64))
