"""Generation: decode caches against full forwards, greedy against argmax, sampling filters."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.sampling import generate, sample_logits
from model.config import TransformerConfig
from model.layer_stack import unstack_layers
from model.transformer import TransformerLM

VOCAB = 64
WINDOW = 4


def _config(**overrides):
    base = dict(vocab_size=VOCAB, num_layers=2, d_model=32, num_heads=2, mlp_dim=64,
                window_size=WINDOW)
    return TransformerConfig.from_config(base, **overrides)


def _setup(config, batch=2, length=40):
    tokens = jax.random.randint(jax.random.key(0), (batch, length), 0, VOCAB)
    params = jax.jit(TransformerLM(config).init)(jax.random.key(1), tokens)["params"]
    return tokens, params


@pytest.mark.parametrize("position_embedding,scan_layers", [
    ("rope", False), ("relative", True), ("none", False)])
def test_decode_logits_equal_full_forward_far_past_the_window(position_embedding, scan_layers):
    config = _config(position_embedding=position_embedding, scan_layers=scan_layers)
    prompt_len, total = 3 * WINDOW + 3, 8 * WINDOW  # prompt and continuation both > 3 windows
    tokens, params = _setup(config, length=total)
    full = jax.jit(TransformerLM(config).apply)({"params": params}, tokens)

    decoder = TransformerLM(config, decode=True)
    cache = jax.jit(decoder.init)(jax.random.key(1), tokens[:, :1])["cache"]
    np.testing.assert_allclose(_decode(decoder, params, cache, tokens, prompt_len), full,
                               atol=1e-4, rtol=1e-4)


def _decode(decoder, params, cache, tokens, prompt_len):
    """Logits of a prefill of ``tokens[:, :prompt_len]``, then one decode step per token."""
    step = jax.jit(lambda cache, t: decoder.apply({"params": params, "cache": cache}, t,
                                                  mutable=["cache"]))
    logits, updated = step(cache, tokens[:, :prompt_len])
    decoded = [logits]
    for t in range(prompt_len, tokens.shape[1]):
        logits, updated = step(updated["cache"], tokens[:, t:t + 1])
        decoded.append(logits)
    return jnp.concatenate(decoded, axis=1)


def test_greedy_generation_equals_argmax_of_repeated_full_forwards():
    config = _config()
    tokens, params = _setup(config, batch=2, length=3 * WINDOW + 1)
    new = 3 * WINDOW + 2
    generated, lengths = generate(params, tokens, jax.random.key(0), config=config,
                                  max_new_tokens=new, temperature=0.0)
    # The full forward over the final length (one compilation): causal, so the logits at t
    # see only the tokens up to t, whatever fills the positions after it.
    forward = jax.jit(lambda sequence: TransformerLM(config).apply({"params": params}, sequence))
    sequence = jnp.pad(tokens, ((0, 0), (0, new)))
    for t in range(tokens.shape[1], tokens.shape[1] + new):
        sequence = sequence.at[:, t].set(jnp.argmax(forward(sequence)[:, t - 1], axis=-1))
    np.testing.assert_array_equal(generated, sequence[:, tokens.shape[1]:])
    np.testing.assert_array_equal(lengths, [new, new])


def test_same_key_same_sample_and_filters_that_reduce_to_greedy():
    config = _config()
    tokens, params = _setup(config, length=6)
    sample = lambda key, **kw: generate(params, tokens, key, config=config,  # noqa: E731
                                        max_new_tokens=20, **kw)[0]
    first = sample(jax.random.key(3), temperature=1.0)
    np.testing.assert_array_equal(first, sample(jax.random.key(3), temperature=1.0))
    assert not np.array_equal(first, sample(jax.random.key(4), temperature=1.0))
    greedy = sample(jax.random.key(3), temperature=0.0)
    np.testing.assert_array_equal(sample(jax.random.key(3), temperature=1.0, top_k=1), greedy)
    np.testing.assert_array_equal(sample(jax.random.key(3), temperature=1.0, top_p=1e-6), greedy)


def test_generation_stops_at_the_end_token():
    config = _config()
    tokens, params = _setup(config, length=6)
    greedy, _ = generate(params, tokens, jax.random.key(0), config=config, max_new_tokens=10,
                         temperature=0.0)
    end_token = int(greedy[0, 3])  # row 0 produces it at step 3 at the latest
    generated, lengths = generate(params, tokens, jax.random.key(0), config=config,
                                  max_new_tokens=10, temperature=0.0, end_token=end_token)
    first_end = int(np.argmax(np.asarray(greedy[0]) == end_token))
    assert int(lengths[0]) == first_end + 1
    np.testing.assert_array_equal(generated[0, :first_end + 1], greedy[0, :first_end + 1])
    assert bool(jnp.all(generated[0, first_end + 1:] == end_token))


def test_top_k_and_top_p_restrict_the_support():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.1, 0.05, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 2000)
    draw = jax.vmap(lambda key, **kw: sample_logits(logits, key, **kw)[0])
    top_2 = jax.vmap(lambda key: sample_logits(logits, key, top_k=2)[0])(keys)
    assert set(np.unique(top_2)) == {0, 1}
    nucleus = jax.vmap(lambda key: sample_logits(logits, key, top_p=0.85)[0])(keys)
    assert set(np.unique(nucleus)) == {0, 1, 2}  # 0.5 + 0.3 < 0.85 <= 0.9
    plain = draw(keys)
    assert abs(float(jnp.mean(plain == 0)) - 0.5) < 0.04


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=-1.0), "temperature=-1.0"),
    (dict(top_k=65), "top_k=65"),
    (dict(top_p=0.0), "top_p=0.0"),
    (dict(max_new_tokens=0), "max_new_tokens >= 1"),
])
def test_bad_sampling_arguments_raise_one_line_errors(kwargs, message):
    config = _config()
    tokens, params = _setup(config, length=4)
    with pytest.raises(ValueError, match=message):
        generate(params, tokens, jax.random.key(0), config=config,
                 **(dict(max_new_tokens=3) | kwargs))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_decode_with_global_layers_and_grouped_heads_equals_the_full_forward(scan_layers):
    """Local layers (rolling caches) and global layers (a cache of every position) together,
    with 2 key/value heads for 4 query heads: generation's logits equal the full forward's
    far past the local layers' reach, greedy tokens equal argmax of repeated forwards."""
    config = _config(num_layers=3, num_heads=4, num_kv_heads=2, global_layers=(1,),
                     scan_layers=scan_layers)
    prompt_len, total = 2 * WINDOW + 3, 7 * WINDOW
    tokens, params = _setup(config, length=total)
    full = jax.jit(lambda t: TransformerLM(config).apply({"params": params}, t))
    generated, _ = generate(params, tokens[:, :prompt_len], jax.random.key(0), config=config,
                            max_new_tokens=total - prompt_len, temperature=0.0)
    sequence = jnp.concatenate([tokens[:, :prompt_len], generated], axis=1)
    np.testing.assert_array_equal(generated, jnp.argmax(full(sequence), -1)[:, prompt_len - 1:-1])

    unscanned = dataclasses.replace(config, scan_layers=False)
    layer_params = unstack_layers(params, config) if scan_layers else params
    decoder = TransformerLM(unscanned, decode=True, decode_length=total)
    cache = jax.jit(decoder.init)(jax.random.key(1), tokens[:, :1])["cache"]
    assert cache["layer_1"]["attention"]["cached_key"].shape == (2, total, 2, 8)  # global
    assert cache["layer_0"]["attention"]["cached_key"].shape == (2, WINDOW + 1, 2, 8)
    np.testing.assert_allclose(_decode(decoder, layer_params, cache, tokens, prompt_len),
                               full(tokens), atol=1e-4, rtol=1e-4)
