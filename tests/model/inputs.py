"""Random inputs shared by the model tests: attention's q, k, v and packed document ids, and a
small language model (config, tokens, parameters)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from model import TransformerConfig, TransformerLM


def qkv(shape, dtype=jnp.float32, seed=0):
    """Three standard-normal arrays of ``shape`` and ``dtype``: q, k, v."""
    return [jax.random.normal(key, shape, dtype) for key in jax.random.split(jax.random.key(seed), 3)]


# Uneven documents, a padding run at the end, ids that come back after another document (runs,
# not ids, are documents) and unused slots (max_segments > documents).
DOCUMENT_LENGTHS = ((50, 30, 120, 80, 20), (300,), (10, 290))


def document_ids(lengths, total=300):
    """int32 ``(len(lengths), total)`` segment ids: row r holds documents of ``lengths[r]``
    positions (ids 1, 2, 3, 1, ...), then zeros."""
    rows = []
    for row in lengths:
        ids = np.concatenate([np.full(n, i % 3 + 1) for i, n in enumerate(row)])
        rows.append(np.pad(ids, (0, total - ids.size)))
    return jnp.asarray(np.stack(rows), jnp.int32)


VOCAB = 300


def small_config(**overrides) -> TransformerConfig:
    """A 2-layer, 32-wide model with a window of 4 over ``VOCAB`` tokens, and ``overrides``."""
    base = dict(vocab_size=VOCAB, num_layers=2, d_model=32, num_heads=4, mlp_dim=64,
                window_size=4)
    return TransformerConfig.from_config(base, **overrides)


def random_tokens(batch=2, length=40, seed=0):
    """int ``(batch, length)`` tokens in ``[0, VOCAB)``."""
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, VOCAB)


def init_params(config, tokens):
    """The (boxed) parameters of ``TransformerLM(config)`` initialised on ``tokens``."""
    return jax.jit(TransformerLM(config).init)(jax.random.key(1), tokens)["params"]


def stacked_params(params, num_layers):
    """Unrolled parameters (``layer_i``) as the scanned model's (``layers``, stacked)."""
    unboxed = nn.unbox(params)
    scanned = {k: v for k, v in unboxed.items() if not k.startswith("layer_")}
    scanned["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs),
                                     *[unboxed[f"layer_{i}"] for i in range(num_layers)])
    return scanned
