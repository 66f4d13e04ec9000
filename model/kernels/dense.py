"""The ``"dense"`` implementation: ``jax.nn.dot_product_attention`` over the full ``(n, n)``
scores (O(n²) time and memory), a baseline for the blocked kernel; with a logit soft-cap,
which jax's function does not take, the same scores written out."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from errors import UserError
from model.kernels.common import grouped, masked_softmax_parts, query_groups, soft_cap


def dense_local_attention(q, k, v, mask, rel_pos_emb, window_size_left, window_size_right,
                          dropout_rate, dropout_rng, segment_ids, *, block_size, precision,
                          max_segments, scale, logit_soft_cap):
    """``jax.nn.dot_product_attention`` with the same semantics, materialising (n, n) scores.

    Takes `model.local_attention`'s arguments (checked there) and returns its
    ``(..., seq_len, head_dim)`` in q's dtype. A one-line `UserError` for rel_pos_emb or
    dropout, which it does not compute."""
    del dropout_rng, block_size, max_segments
    if rel_pos_emb is not None or dropout_rate > 0.0:
        raise UserError("implementation='dense' supports neither rel_pos_emb nor dropout; "
                        "use implementation='xla'")
    groups = query_groups(q, k)
    *lead, seq_len, head_dim = k.shape
    # The layout of jax.nn.dot_product_attention, which groups query heads natively: q
    # (batch·kv_heads, n, groups, d) against k, v (batch·kv_heads, n, 1, d).
    q_bthd = jnp.swapaxes(grouped(q, groups), 1, 2)
    as_bthd = lambda x: x.reshape(-1, seq_len, 1, head_dim)  # noqa: E731

    def heads_first(out):  # (batch·kv_heads, n, groups, d) -> q's shape
        return jnp.swapaxes(out, 1, 2).reshape(q.shape)

    if mask is None and segment_ids is None and logit_soft_cap is None:
        causal = window_size_right == 0 and window_size_left >= seq_len - 1
        out = jax.nn.dot_product_attention(
            q_bthd, as_bthd(k), as_bthd(v), scale=scale, is_causal=causal,
            local_window_size=None if causal else (window_size_left, window_size_right))
        return heads_first(out)
    position = jnp.arange(seq_len)
    visible = ((position[None, :] >= position[:, None] - window_size_left)
               & (position[None, :] <= position[:, None] + window_size_right))
    if mask is not None:
        visible = visible & mask.astype(bool)[..., None, :]
    if segment_ids is not None:
        visible = visible & (segment_ids[..., :, None] == segment_ids[..., None, :])
    visible = jnp.broadcast_to(visible, (*lead, seq_len, seq_len)).reshape(-1, 1, seq_len, seq_len)
    if logit_soft_cap is None:
        out = jax.nn.dot_product_attention(q_bthd, as_bthd(k), as_bthd(v), mask=visible,
                                           scale=scale)
    else:
        out = _capped_attention(q_bthd, as_bthd(k), as_bthd(v), visible,
                                head_dim ** -0.5 if scale is None else scale, logit_soft_cap,
                                precision)
    # jax averages all values for a query that sees nothing; local_attention returns zeros.
    return heads_first(jnp.where(visible.any(axis=-1)[:, 0, :, None, None], out, 0))


def _capped_attention(q, k, v, visible, scale, logit_soft_cap, precision):
    """Softmax attention over the soft-capped scores ``cap · tanh(scale · q·k / cap)``, written
    out: q ``(B, n, groups, d)``, k, v ``(B, n, 1, d)``, visible bool ``(B, 1, n, n)`` ->
    ``(B, n, groups, d)`` in q's dtype (float32 scores and softmax)."""
    scores = jnp.einsum("bqgd,bkd->bgqk", q, k[:, :, 0], precision=precision,
                        preferred_element_type=jnp.float32)
    (exps,), total, _ = masked_softmax_parts([soft_cap(scores * scale, logit_soft_cap)],
                                             [visible])
    out = jnp.einsum("bgqk,bkd->bqgd", exps, v[:, :, 0].astype(jnp.float32), precision=precision)
    return (out / jnp.where(total > 0, total, 1.0)[..., None].swapaxes(1, 2)).astype(q.dtype)
