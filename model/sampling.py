"""Autoregressive generation with the rolling attention caches.

The prompt is prefilled in one call (each local attention layer runs the blocked kernel over it
and keeps its last ``window_size + 1`` keys and values; a global layer keeps room for all of
the prompt and the new tokens); then a ``lax.while_loop`` samples one token per step. The step
compiles once, and without global layers memory does not grow with the generated length.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from errors import UserError
from model.config import TransformerConfig
from model.layer_stack import unstack_layers
from model.transformer import TransformerLM


def sample_logits(logits: jax.Array, key: jax.Array, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
    """Draws one token per row of ``logits (batch, vocab)`` float32; returns int32 ``(batch,)``.

    ``temperature == 0`` is greedy (argmax). Otherwise logits are divided by the temperature,
    then restricted to the ``top_k`` largest (0: no limit) and to the smallest set whose
    probability reaches ``top_p`` (nucleus sampling; 1.0: no limit).
    """
    if temperature < 0:
        raise UserError(f"temperature={temperature!r}: expected >= 0 (0 is greedy)")
    if not 0 <= top_k <= logits.shape[-1]:
        raise UserError(f"top_k={top_k!r}: expected 0 (no limit) up to the vocabulary size "
                        f"{logits.shape[-1]}")
    if not 0.0 < top_p <= 1.0:
        raise UserError(f"top_p={top_p!r}: expected a probability in (0, 1]")
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k:
        kth_largest = lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    if top_p < 1.0:
        descending = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(descending, axis=-1)
        # Keep a token while the probability before it is below top_p (the first always stays).
        kept = jnp.cumsum(probs, axis=-1) - probs < top_p
        threshold = jnp.min(jnp.where(kept, descending, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "temperature", "top_k",
                                             "top_p", "end_token"))
def generate(params, prompt: jax.Array, key: jax.Array, *, config: TransformerConfig,
             max_new_tokens: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             end_token: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Continues ``prompt (batch, prompt_len)`` int32 by up to ``max_new_tokens`` tokens.

    Args:
      params: the `TransformerLM` parameters (the same tree with and without decode).
      prompt: token ids, at least one per row; all rows the same length.
      key: PRNG key; the same key gives the same sample.
      config: the model's `TransformerConfig`.
      max_new_tokens, temperature, top_k, top_p: see `sample_logits`.
      end_token: generation of a row stops after it samples this token (None: never).

    Returns:
      ``(tokens (batch, max_new_tokens) int32, lengths (batch,) int32)``: the generated tokens
      (rows that ended are padded with ``end_token``) and how many each row generated,
      ``end_token`` included.
    """
    if max_new_tokens < 1 or prompt.ndim != 2 or prompt.shape[1] < 1:
        raise UserError(f"generate needs max_new_tokens >= 1 (got {max_new_tokens}) and a prompt "
                        f"of shape (batch, prompt_len >= 1) (got {prompt.shape})")
    if prompt.shape[1] + max_new_tokens >= 2**31:
        raise UserError(f"max_new_tokens={max_new_tokens}: expected fewer than "
                        f"{2**31 - prompt.shape[1]} (positions are int32)")
    if config.scan_layers and config.global_layer_indices:
        # Global and local layers keep caches of different sizes: no scan over them.
        params = unstack_layers(params, config)
        config = dataclasses.replace(config, scan_layers=False)
    decoder = TransformerLM(config, decode=True,
                            decode_length=prompt.shape[1] + max_new_tokens)
    batch = prompt.shape[0]
    cache_shapes = jax.eval_shape(decoder.init, jax.random.key(0), prompt[:, :1])["cache"]
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache_shapes)

    def forward(cache, tokens):
        logits, variables = decoder.apply({"params": params, "cache": cache}, tokens,
                                          mutable=["cache"])
        return logits[:, -1], variables["cache"]

    logits, cache = forward(cache, prompt)
    pad = 0 if end_token is None else end_token

    def not_done(state):
        step, _, _, _, _, finished = state
        return (step < max_new_tokens) & ~jnp.all(finished)

    def one_token(state):
        step, logits, cache, key, tokens, finished = state
        key, sample_key = jax.random.split(key)
        token = jnp.where(finished, pad, sample_logits(logits, sample_key, temperature, top_k,
                                                        top_p))
        tokens = tokens.at[:, step].set(token)
        if end_token is not None:
            finished = finished | (token == end_token)
        logits, cache = forward(cache, token[:, None])
        return step + 1, logits, cache, key, tokens, finished

    state = (jnp.array(0), logits, cache, key,
             jnp.full((batch, max_new_tokens), pad, jnp.int32), jnp.zeros((batch,), bool))
    _, _, _, _, tokens, _ = lax.while_loop(not_done, one_token, state)
    if end_token is None:
        lengths = jnp.full((batch,), max_new_tokens, jnp.int32)
    else:
        is_end = tokens == end_token
        lengths = jnp.where(is_end.any(axis=-1), jnp.argmax(is_end, axis=-1) + 1, max_new_tokens)
    return tokens, lengths.astype(jnp.int32)
