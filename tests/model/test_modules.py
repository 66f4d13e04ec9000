"""`MultiHeadLocalAttention` / `LocalSelfAttention` against Flax's modules and themselves."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import LocalSelfAttention, MultiHeadLocalAttention


def _inputs(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape)


@pytest.mark.parametrize("left,right", [(5, 3), (7, 0), (100, 100)])
def test_equals_flax_multi_head_attention_with_a_band_mask(left, right):
    x = _inputs((2, 40, 16))
    ours = MultiHeadLocalAttention(num_heads=4, qkv_features=32, window_size_left=left,
                                   window_size_right=right)
    flax_attention = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=32)
    params = ours.init(jax.random.key(1), x)
    # Same parameter tree as Flax's, so weights move between the two.
    flax_params = flax_attention.init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, flax_params)
    position = jnp.arange(40)
    band = ((position[None, :] >= position[:, None] - left)
            & (position[None, :] <= position[:, None] + right))
    np.testing.assert_allclose(ours.apply(params, x),
                               flax_attention.apply(params, x, mask=band[None, None]),
                               atol=2e-5, rtol=2e-5)


def test_self_attention_equals_multi_head_and_cross_inputs_are_used():
    x, y = _inputs((2, 30, 8)), _inputs((2, 30, 8), seed=1)
    self_attention = LocalSelfAttention(num_heads=2, window_size_left=4, window_size_right=4)
    params = self_attention.init(jax.random.key(0), x)
    multi_head = MultiHeadLocalAttention(num_heads=2, window_size_left=4, window_size_right=4)
    np.testing.assert_array_equal(self_attention.apply(params, x), multi_head.apply(params, x))
    assert not np.allclose(multi_head.apply(params, x, y), multi_head.apply(params, x))


def test_key_padding_mask_hides_keys():
    x = _inputs((1, 24, 8))
    mask = jnp.arange(24)[None, :] % 3 != 0
    attention = LocalSelfAttention(num_heads=2, window_size_left=6, window_size_right=6)
    params = attention.init(jax.random.key(0), x)
    # Changing masked positions changes no other position's output.
    changed = x.at[:, ::3].set(_inputs((1, 8, 8), seed=4))
    before, after = (attention.apply(params, inputs, mask=mask) for inputs in (x, changed))
    np.testing.assert_allclose(before[:, mask[0]], after[:, mask[0]], atol=1e-6)


@pytest.mark.parametrize("use_rel_pos_emb,rotary_base,prompt_len,options", [
    (False, None, 1, {}), (True, None, 4, {}), (False, 10_000.0, 9, {}),
    # Gemma 2's attention scale and logit soft-cap, the cap over the relative positions' part
    # too; it binds (scores of order several against a cap of 1).
    (True, 100.0, 17, dict(attention_scale=0.7, logit_soft_cap=1.0))])
def test_decode_step_by_step_equals_full_causal_forward(use_rel_pos_emb, rotary_base, prompt_len,
                                                        options):
    window, steps = 6, 23  # more than 3 windows: the rolling cache wraps around several times
    x = _inputs((2, steps, 16))
    attention = MultiHeadLocalAttention(num_heads=2, qkv_features=16, window_size_left=window,
                                        window_size_right=0, use_rel_pos_emb=use_rel_pos_emb,
                                        rotary_base=rotary_base, **options)
    params = attention.init(jax.random.key(1), x)["params"]
    if use_rel_pos_emb:  # the default init is small; make the embeddings matter
        params["rel_pos_emb"] = _inputs(params["rel_pos_emb"].shape, seed=2)
    full = attention.apply({"params": params}, x)
    if options:
        uncapped = attention.clone(attention_scale=None, logit_soft_cap=None)
        assert float(jnp.abs(full - uncapped.apply({"params": params}, x)).max()) > 0.1

    decoder = attention.clone(decode=True)
    variables = decoder.init(jax.random.key(1), x[:, :1])
    # Same parameters as without decode; the cache holds window + 1 positions, whatever the steps.
    assert jax.tree.map(jnp.shape, variables["params"]) == jax.tree.map(jnp.shape, params)
    assert variables["cache"]["cached_key"].shape == (2, window + 1, 2, 8)
    step = jax.jit(lambda cache, tokens: decoder.apply({"params": params, "cache": cache}, tokens,
                                                       mutable=["cache"]))
    # The prompt is prefilled in one call, then one token per call.
    out, updated = step(variables["cache"], x[:, :prompt_len])
    cache, outputs = updated["cache"], [out]
    for t in range(prompt_len, steps):
        out, updated = step(cache, x[:, t:t + 1])
        cache = updated["cache"]
        outputs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outputs, axis=1), full, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("prompt_len", [1, 7])
def test_decoding_packed_documents_equals_the_full_forward_pass(prompt_len):
    """Segment ids reach the decode cache: a token attends only cached keys of its own
    document (given per call, or, without ids, the previous token's)."""
    window, steps = 4, 14
    x = _inputs((2, steps, 16))
    segment_ids = jnp.array([[1] * 3 + [2] * 2 + [3] * 9, [5] * 6 + [6] * 8])
    attention = MultiHeadLocalAttention(num_heads=2, qkv_features=16, window_size_left=window,
                                        window_size_right=0, rotary_base=10_000.0)
    params = attention.init(jax.random.key(1), x)["params"]
    full = attention.apply({"params": params}, x, segment_ids=segment_ids)
    decoder = attention.clone(decode=True)
    cache = decoder.init(jax.random.key(1), x[:, :1])["cache"]

    def step(cache, start, stop, ids):
        out, updated = decoder.apply({"params": params, "cache": cache}, x[:, start:stop],
                                     segment_ids=ids, mutable=["cache"])
        return out, updated["cache"]

    out, cache = step(cache, 0, prompt_len, segment_ids[:, :prompt_len])
    outputs = [out]
    for t in range(prompt_len, steps):
        # The last document's tokens come without ids: they continue the previous token's.
        ids = None if t >= 9 else segment_ids[:, t:t + 1]
        out, cache = step(cache, t, t + 1, ids)
        outputs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outputs, axis=1), full, atol=2e-5, rtol=2e-5)


def test_decode_needs_a_causal_window_and_a_prompt_restarts_the_sequence():
    x = _inputs((1, 9, 8))
    with pytest.raises(ValueError, match="window_size_right=0"):
        MultiHeadLocalAttention(num_heads=2, window_size_left=3, window_size_right=1,
                                decode=True).init(jax.random.key(0), x)
    decoder = MultiHeadLocalAttention(num_heads=2, window_size_left=3, window_size_right=0,
                                      rotary_base=10_000.0, decode=True)
    variables = decoder.init(jax.random.key(0), x[:, :1])
    _, first = decoder.apply(variables, x, mutable=["cache"])
    _, stepped = decoder.apply(variables | first, x[:, :1], mutable=["cache"])
    # A multi-token call prefills a new sequence, whatever the cache held (rotary positions too).
    _, again = decoder.apply(variables | stepped, x, mutable=["cache"])
    for name in first["cache"]:
        np.testing.assert_allclose(first["cache"][name], again["cache"][name], atol=1e-6)
    with pytest.raises(ValueError, match="prefill batch shape"):
        decoder.apply(variables, jnp.concatenate([x, x]), mutable=["cache"])


def test_dropout_keys_prng_key_dropout_rng_and_rngs_agree():
    x = _inputs((2, 32, 16))
    attention = LocalSelfAttention(num_heads=2, window_size_left=8, window_size_right=8,
                                   dropout_rate=0.3)
    key = jax.random.key(3)
    params = attention.init(key, x, prng_key=key)
    by_prng_key = attention.apply(params, x, prng_key=key)
    np.testing.assert_array_equal(by_prng_key, attention.apply(params, x, prng_key=key))
    np.testing.assert_array_equal(by_prng_key, attention.apply(params, x, dropout_rng=key))
    assert not np.allclose(by_prng_key, attention.apply(params, x, prng_key=jax.random.key(4)))
    by_rngs = attention.apply(params, x, rngs={"dropout": key})
    np.testing.assert_array_equal(by_rngs, attention.apply(params, x, rngs={"dropout": key}))
    assert not np.allclose(by_rngs, attention.apply(params, x, deterministic=True))
    # No key and no rng stream: no dropout, as with deterministic=True.
    np.testing.assert_array_equal(attention.apply(params, x),
                                  attention.apply(params, x, deterministic=True))
    with pytest.raises(Exception, match="dropout"):
        attention.apply(params, x, deterministic=False)


def test_rotary_embedding_rotates_pairs_and_keeps_relative_scores():
    from model.rope import apply_rotary
    x = _inputs((1, 5, 2, 8))
    rotated = apply_rotary(x, jnp.arange(5), 10_000.0)
    # A rotation: norms kept, position 0 unchanged.
    np.testing.assert_allclose(jnp.linalg.norm(rotated, axis=-1), jnp.linalg.norm(x, axis=-1),
                               rtol=1e-5)
    np.testing.assert_allclose(rotated[:, 0], x[:, 0], atol=1e-6)
    # q·k depends only on the distance: shifting both positions by 7 changes no score.
    shifted = apply_rotary(x, jnp.arange(5) + 7, 10_000.0)
    scores = lambda y: jnp.einsum("bqhd,bkhd->bhqk", y, y)  # noqa: E731
    np.testing.assert_allclose(scores(rotated), scores(shifted), atol=1e-4)


def test_heads_must_divide_features():
    with pytest.raises(ValueError, match="divisible by num_heads=3"):
        LocalSelfAttention(num_heads=3).init(jax.random.key(0), _inputs((1, 4, 8)))


@pytest.mark.parametrize("num_kv_heads", [2, 1])
def test_grouped_key_value_heads_equal_repeated_heads_and_decode(num_kv_heads):
    """num_kv_heads < num_heads: the same function as all heads with the key/value kernels
    repeated per group; the decode cache holds only the key/value heads and decoding step by
    step equals the full forward."""
    window, steps, heads = 5, 19, 4
    x = _inputs((2, steps, 16))
    grouped = MultiHeadLocalAttention(num_heads=heads, num_kv_heads=num_kv_heads,
                                      qkv_features=16, window_size_left=window,
                                      window_size_right=0, rotary_base=10_000.0)
    params = grouped.init(jax.random.key(1), x)["params"]
    assert params["key"]["kernel"].shape == (16, num_kv_heads, 4)
    repeated = jax.tree.map(lambda p: p, params)
    for name in ("key", "value"):
        repeated[name] = {k: jnp.repeat(v, heads // num_kv_heads, axis=1 if k == "kernel" else 0)
                          for k, v in params[name].items()}
    full = grouped.apply({"params": params}, x)
    np.testing.assert_allclose(full, grouped.clone(num_kv_heads=None).apply(
        {"params": repeated}, x), atol=2e-5, rtol=2e-5)

    decoder = grouped.clone(decode=True)
    cache = decoder.init(jax.random.key(1), x[:, :1])["cache"]
    assert cache["cached_key"].shape == (2, window + 1, num_kv_heads, 4)
    step = jax.jit(lambda cache, x: decoder.apply({"params": params, "cache": cache}, x,
                                                  mutable=["cache"]))
    out, updated = step(cache, x[:, :3])
    outputs = [out]
    for t in range(3, steps):
        out, updated = step(updated["cache"], x[:, t:t + 1])
        outputs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outputs, axis=1), full, atol=2e-5, rtol=2e-5)
