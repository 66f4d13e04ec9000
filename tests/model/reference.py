"""Dense O(n²) local attention written independently of model/, for tests."""

import jax.numpy as jnp
import numpy as np


def dense_local_attention(q, k, v, window_size_left, window_size_right, mask=None,
                          segment_ids=None, rel_pos_emb=None, scale=None, logit_soft_cap=None):
    """``q, k, v (..., n, d)``; the semantics of `model.local_attention`, materialising
    the full ``(n, n)`` score matrix. A query with no visible key returns zeros. The logits
    are ``scale`` (default 1/sqrt(d)) times q·(k + rel), then, with a ``logit_soft_cap``,
    ``cap · tanh(logit / cap)`` (transformers' Gemma 2 eager attention)."""
    n = q.shape[-2]
    query = np.arange(n)[:, None]
    key = np.arange(n)[None, :]
    visible = (key >= query - window_size_left) & (key <= query + window_size_right)
    if mask is not None:
        visible = visible & mask[..., None, :]
    if segment_ids is not None:
        visible = visible & (segment_ids[..., :, None] == segment_ids[..., None, :])
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
    scores = jnp.einsum("...qd,...kd->...qk", q32, k32)
    if rel_pos_emb is not None:
        offset = np.clip(key - query + window_size_left, 0, window_size_left + window_size_right)
        scores = scores + jnp.einsum("...qd,...qkd->...qk", q32,
                                     rel_pos_emb.astype(jnp.float32)[..., offset, :])
    scores = scores / np.sqrt(q.shape[-1]) if scale is None else scores * scale
    if logit_soft_cap is not None:
        scores = logit_soft_cap * jnp.tanh(scores / logit_soft_cap)
    scores = jnp.where(visible, scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    weights = jnp.exp(scores - jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    total = weights.sum(axis=-1, keepdims=True)
    weights = weights / jnp.where(total > 0, total, 1.0)
    return jnp.einsum("...qk,...kd->...qd", weights, v32).astype(q.dtype)
