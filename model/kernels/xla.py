"""The ``"xla"`` implementation: exact sliding-window attention in O(n·w) time and O(n·d) memory.

Query ``i`` attends key ``j`` iff ``i - window_size_left <= j <= i + window_size_right``
(the convention of ``jax.nn.dot_product_attention(local_window_size=(left, right))`` and of
FlashAttention's ``window_size``), the key is not masked out, and both lie in the same segment.

How it works (the ``"xla"`` implementation):

* The sequence is cut into query blocks of ``block`` positions, and the keys (padded with
  ``left`` positions in front) into key blocks of the same length. Query block ``b`` can only see
  key blocks ``b .. b + views - 1``, ``views = ceil((block + left + right) / block)``. For each
  of these *views* one batched ``(block, d) x (d, block)`` matmul gives the scores, and a band
  mask makes them exact. Work is O(n · (w + block) · d) instead of O(n² · d), and no key is
  copied into per-block frames (the seed's per-query gather held O(n · w · d)).
* Blocks are processed in chunks of ``blocks_per_chunk`` under ``lax.map``, so the live working
  set is one chunk's scores however long the sequence is.
* Softmax statistics are float32. Only the output and the per-query log-sum-exp are kept for
  the backward pass (a ``jax.custom_vjp``), which recomputes the scores chunk by chunk
  (FlashAttention's recipe). Memory is therefore O(n · d) plus one chunk.

The attention scale multiplies q before the blocks are cut; a logit soft-cap (Gemma 2's) maps
each block of scores, relative positions' part included, to ``cap · tanh(s / cap)`` before the
mask (`model.kernels.common.soft_cap`), and the backward pass recomputes it with the scores.

The views of one query block hold every key it can see, so its softmax is exact in one pass
over them: the row maximum is taken over all views before exponentiating, which is what an
online (running max and sum) softmax converges to, without the rescaling.

A window over at least half the sequence (a global layer's) runs the looped schedule instead
(``Plan.loop_over_key_blocks``): most of the band's views would lie before position 0 or past
the end, so each query block loops over only the key blocks its window reaches, with an online
softmax (see `model.kernels.xla_looped`). A whole-sequence causal window computes ~N²/2 block
pairs, not the band's N·(N + 1). Relative position embeddings keep the band schedule.

Where it lives: this module pads and flattens the inputs (`xla_local_attention`) and holds the
custom VJP; `model.kernels.xla_plan` the tiling (`Plan`, `make_plan`) and the score mask;
`model.kernels.xla_band` and `model.kernels.xla_looped` the two schedules' forward and backward.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from model.kernels.common import grouped, pad_sequence, query_groups
from model.kernels.xla_band import band_backward, band_forward
from model.kernels.xla_looped import looped_backward, looped_forward
from model.kernels.xla_plan import Plan, make_plan


def xla_local_attention(q, k, v, mask, rel_pos_emb, window_size_left, window_size_right,
                        dropout_rate, dropout_rng, segment_ids, *, block_size, precision,
                        max_segments, scale, logit_soft_cap, query_offset=0):
    """Blocked local attention in plain XLA: pads and flattens, then runs the custom-vjp core.

    ``query_offset`` (static; for model/context_parallel.py): q may hold only the positions
    ``[query_offset, query_offset + q_len)`` of k and v's sequence (then without
    rel_pos_emb); ``mask`` and ``segment_ids`` describe the keys. The output has q's shape.

    Otherwise it takes `model.local_attention`'s arguments (checked there) and returns its
    ``(..., seq_len, head_dim)`` in q's dtype, for every feature. A one-line ValueError for
    queries that do not lie in the keys' sequence, or an offset with rel_pos_emb."""
    del max_segments  # segment ids of any kind are exact here
    groups = query_groups(q, k)
    *lead, seq_len, head_dim = k.shape
    query_len = q.shape[-2]
    if query_offset + query_len > seq_len:
        raise ValueError(f"queries [{query_offset}, {query_offset + query_len}) must lie in the "
                         f"keys' sequence of {seq_len}")
    batch = math.prod(lead)  # one row per key/value head; its query heads are its groups
    plan = make_plan(batch * groups, seq_len, window_size_left, window_size_right, block_size,
                     dropout_rate, precision, has_rel_pos_emb=rel_pos_emb is not None,
                     query_len=query_len, query_offset=query_offset,
                     logit_soft_cap=logit_soft_cap)

    def flat(x, trailing):
        return jnp.broadcast_to(x, (*lead, *trailing)).reshape(batch, *trailing)

    # Queries are padded at the end to whole chunks. Keys get `left` positions in front, so that
    # query block b's window starts in key block b, and enough after for the last block's views.
    # Padding keys are marked invalid. The query heads of one key/value head share its key
    # blocks: query blocks are (batch, num_blocks, groups, block, head_dim).
    # The scale goes into q (the relative positions' logits get it with q).
    q_rows = grouped(q * (head_dim ** -0.5 if scale is None else scale),
                     groups)  # (batch, groups, query_len, head_dim)
    q_rows = pad_sequence(q_rows, 0, plan.padded_len - query_len, axis=-2)
    q_blocks = jnp.moveaxis(q_rows.reshape(batch, groups, plan.num_blocks, plan.block, head_dim),
                            1, 2)
    key_pad = (plan.keys_before, plan.padded_keys - plan.keys_before - seq_len)
    k_pad = pad_sequence(flat(k, (seq_len, head_dim)), *key_pad)
    v_pad = pad_sequence(flat(v, (seq_len, head_dim)), *key_pad)
    key_valid = jnp.ones((batch, seq_len), bool) if mask is None else flat(mask.astype(bool), (seq_len,))
    key_valid = pad_sequence(key_valid, *key_pad)
    segments = None
    if segment_ids is not None:
        ids = flat(segment_ids.astype(jnp.int32), (seq_len,))
        query_ids = ids[:, query_offset:query_offset + query_len]
        segments = (pad_sequence(query_ids, 0, plan.padded_len - query_len),
                    pad_sequence(ids, *key_pad))
    rel = None
    if rel_pos_emb is not None:
        width = plan.left + plan.right + 1
        rel = rel_pos_emb[..., plan.rel_offset:plan.rel_offset + width, :].astype(q.dtype)
        rel = grouped(jnp.broadcast_to(rel, (*q.shape[:-2], width, head_dim)), groups)
    blocks = functools.partial(_to_blocks, block=plan.block)
    if segments is not None:
        segments = tuple(map(blocks, segments))
    out = _blocked_attention(plan, q_blocks, blocks(k_pad), blocks(v_pad), blocks(key_valid),
                             segments, rel, dropout_rng)  # (batch, num_blocks, groups, block, d)
    out = jnp.moveaxis(out, 2, 1).reshape(batch, groups, plan.padded_len, head_dim)
    return out[:, :, :query_len].reshape(q.shape)


def _to_blocks(x: jax.Array, block: int) -> jax.Array:
    """``(batch, n, ...) -> (batch, n / block, block, ...)``."""
    return x.reshape(x.shape[0], x.shape[1] // block, block, *x.shape[2:])


def _forward(plan: Plan, q_blocks, k_blocks, v_blocks, key_valid, segments, rel, dropout_rng):
    """Returns the output ``(B, num_blocks, groups, block, d)`` and the log-sum-exp
    ``(B, num_blocks, groups, block)``, by the schedule that ``plan`` picks."""
    if plan.loop_over_key_blocks:
        return looped_forward(plan, q_blocks, k_blocks, v_blocks, key_valid, segments,
                              dropout_rng)
    return band_forward(plan, q_blocks, k_blocks, v_blocks, key_valid, segments, rel, dropout_rng)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _blocked_attention(plan, q_blocks, k_blocks, v_blocks, key_valid, segments, rel, dropout_rng):
    return _forward(plan, q_blocks, k_blocks, v_blocks, key_valid, segments, rel, dropout_rng)[0]


def _blocked_attention_fwd(plan, q_blocks, k_blocks, v_blocks, key_valid, segments, rel,
                           dropout_rng):
    out, lse = _forward(plan, q_blocks, k_blocks, v_blocks, key_valid, segments, rel, dropout_rng)
    return out, (q_blocks, k_blocks, v_blocks, key_valid, segments, rel, dropout_rng, out, lse)


def _blocked_attention_bwd(plan, residuals, d_out):
    q_blocks, k_blocks, v_blocks, key_valid, segments, rel, dropout_rng, out, lse = residuals
    # D_i = dO_i · O_i = sum_j P_ij dP_ij, the softmax-backward correction term.
    correction = jnp.einsum("...d,...d->...", d_out, out, preferred_element_type=jnp.float32)
    d_out = d_out.astype(jnp.float32)
    if plan.loop_over_key_blocks:
        d_q, d_k, d_v = looped_backward(plan, q_blocks, k_blocks, v_blocks, key_valid,
                                        segments, dropout_rng, lse, d_out, correction)
        d_rel = None
    else:
        d_q, d_k, d_v, d_rel = band_backward(plan, q_blocks, k_blocks, v_blocks, key_valid,
                                             segments, rel, dropout_rng, lse, d_out,
                                             correction)
    return (d_q.astype(q_blocks.dtype), d_k.astype(k_blocks.dtype),
            d_v.astype(v_blocks.dtype), None, None,
            None if rel is None else d_rel.astype(rel.dtype), None)


_blocked_attention.defvjp(_blocked_attention_fwd, _blocked_attention_bwd)
