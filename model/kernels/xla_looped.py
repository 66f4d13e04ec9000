"""The looped schedule of the blocked ``"xla"`` kernel (`model.kernels.xla`), for windows about
as wide as the sequence (``plan.loop_over_key_blocks``) and for queries at an offset into the
keys (context parallelism).

Query block b visits only key blocks `_key_block_range` (b), in a loop with a traced trip
count, carrying an online softmax (FlashAttention's running maximum, sum and output). A
whole-sequence causal window thus computes the ~N²/2 block pairs on and below the diagonal,
not the band's N·(N + 1). Keys are not padded in front: key block j holds positions
[j·block, (j + 1)·block).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from model.kernels.common import soft_cap, soft_cap_backward
from model.kernels.xla_plan import Plan, score_mask


def _key_block_range(plan: Plan, query_block):
    """The first and last key block (int32 scalars) that query block ``query_block`` sees."""
    first_query = plan.query_offset + query_block * plan.block
    first_key = jnp.maximum(first_query - plan.left, 0)
    last_key = jnp.minimum(first_query + plan.block - 1 + plan.right, plan.seq_len - 1)
    return first_key // plan.block, last_key // plan.block


def _block_pair(plan: Plan, query_block, key_block, q_blocks, k_blocks, key_valid, segments,
                dropout_rng):
    """Query block ``query_block`` against key block ``key_block``: float32 scores
    ``(B, groups, block, block)`` (soft-capped where ``plan.logit_soft_cap`` says), which of
    them are visible (bool ``(B, 1, block, block)``) and the dropout multiplier of the weights
    (float32, as the scores; None without dropout)."""
    row = functools.partial(lax.dynamic_index_in_dim, axis=1, keepdims=False)
    q, k = row(q_blocks, query_block), row(k_blocks, key_block)
    scores = soft_cap(jnp.einsum("bpqd,bkd->bpqk", q, k, precision=plan.precision,
                                 preferred_element_type=jnp.float32), plan.logit_soft_cap)
    positions = jnp.arange(plan.block)
    key_minus_query = ((key_block - query_block) * plan.block - plan.query_offset
                       + positions[None, :] - positions[:, None])
    visible = score_mask(plan, key_minus_query, row(key_valid, key_block),
                         *((None, None) if segments is None else
                           (row(segments[0], query_block), row(segments[1], key_block))))
    keep = None
    if plan.dropout_rate > 0.0:
        pair_rng = jax.random.fold_in(jax.random.fold_in(dropout_rng, query_block), key_block)
        keep = jax.random.bernoulli(pair_rng, 1.0 - plan.dropout_rate, scores.shape)
        keep = keep.astype(jnp.float32) / (1.0 - plan.dropout_rate)
    return scores, visible[:, None], keep


def _loop_from_first(first, last, body, init):
    """``lax.fori_loop(first, last + 1, body, init)`` with step ``first`` taken outside the
    loop, so that the carry has the types of the body's results (under shard_map they vary
    over mesh axes, which a loop's carry must already do). Needs ``first <= last``."""
    return lax.fori_loop(first + 1, last + 1, body, body(first, init))


def looped_forward(plan: Plan, q_blocks, k_blocks, v_blocks, key_valid, segments,
                   dropout_rng):
    """The looped schedule's output ``(B, num_blocks, groups, block, d)`` (q_blocks' dtype)
    and float32 log-sum-exp ``(B, num_blocks, groups, block)``, one query block at a time."""
    def query_block_forward(query_block):
        def visit(key_block, carry):
            row_max, total, out = carry
            scores, visible, keep = _block_pair(plan, query_block, key_block, q_blocks,
                                                k_blocks, key_valid, segments, dropout_rng)
            scores = jnp.where(visible, scores, -jnp.inf)
            new_max = jnp.maximum(row_max, scores.max(axis=-1))
            shift = jnp.where(jnp.isfinite(new_max), new_max, 0.0)  # rows that see nothing yet
            exps = jnp.exp(scores - shift[..., None])
            rescale = jnp.exp(row_max - shift)  # earlier blocks' share, at the new maximum
            weights = exps if keep is None else exps * keep
            v = lax.dynamic_index_in_dim(v_blocks, key_block, axis=1, keepdims=False)
            out = out * rescale[..., None] + jnp.einsum(
                "bpqk,bkd->bpqd", weights.astype(v.dtype), v, precision=plan.precision,
                preferred_element_type=jnp.float32)
            return new_max, total * rescale + exps.sum(axis=-1), out

        shape = q_blocks.shape[:1] + q_blocks.shape[2:]  # (B, groups, block, d)
        empty = (jnp.full(shape[:-1], -jnp.inf), jnp.zeros(shape[:-1]), jnp.zeros(shape))
        row_max, total, out = _loop_from_first(*_key_block_range(plan, query_block), visit, empty)
        lse = jnp.where(total > 0, row_max + jnp.log(total), jnp.inf)
        out = out / jnp.where(total > 0, total, 1.0)[..., None]
        return out.astype(q_blocks.dtype), lse

    out, lse = lax.map(query_block_forward, jnp.arange(plan.num_blocks))
    return jnp.moveaxis(out, 0, 1), jnp.moveaxis(lse, 0, 1)


def looped_backward(plan: Plan, q_blocks, k_blocks, v_blocks, key_valid, segments,
                    dropout_rng, lse, d_out, correction):
    """float32 gradients ``(d_q, d_k, d_v)`` of the looped schedule, in the blocks' shapes.
    One pass over the query blocks: each adds its key blocks' gradients in place."""
    row = functools.partial(lax.dynamic_index_in_dim, axis=1, keepdims=False)

    def query_block_backward(sums, query_block):
        q, d_o = row(q_blocks, query_block), row(d_out, query_block)
        block_lse = row(lse, query_block)[..., None]
        block_correction = row(correction, query_block)[..., None]

        def visit(key_block, carry):
            d_q, d_k_sum, d_v_sum = carry
            scores, visible, keep = _block_pair(plan, query_block, key_block, q_blocks,
                                                k_blocks, key_valid, segments, dropout_rng)
            k, v = row(k_blocks, key_block), row(v_blocks, key_block)
            probs = jnp.where(visible, jnp.exp(scores - block_lse), 0.0)
            kept = probs if keep is None else probs * keep
            d_kept = jnp.einsum("bpqd,bkd->bpqk", d_o, v.astype(jnp.float32),
                                precision=plan.precision)
            d_probs = d_kept if keep is None else d_kept * keep
            d_scores = soft_cap_backward(scores, probs * (d_probs - block_correction),
                                         plan.logit_soft_cap).astype(q.dtype)
            d_q = d_q + jnp.einsum("bpqk,bkd->bpqd", d_scores, k, precision=plan.precision,
                                   preferred_element_type=jnp.float32)
            d_k = jnp.einsum("bpqk,bpqd->bkd", d_scores, q, precision=plan.precision,
                             preferred_element_type=jnp.float32)
            d_v = jnp.einsum("bpqk,bpqd->bkd", kept, d_o, precision=plan.precision)

            def add_at(total, part):
                return lax.dynamic_update_index_in_dim(
                    total, row(total, key_block) + part, key_block, axis=1)

            return d_q, add_at(d_k_sum, d_k), add_at(d_v_sum, d_v)

        d_q, *sums = _loop_from_first(*_key_block_range(plan, query_block), visit,
                                      (jnp.zeros(q.shape), *sums))
        return tuple(sums), d_q

    sums = (jnp.zeros(k_blocks.shape), jnp.zeros(v_blocks.shape))
    # Query block 0 outside the scan, for the carry's types (as in `_loop_from_first`).
    sums, first_d_q = query_block_backward(sums, 0)
    (d_k, d_v), d_q = lax.scan(query_block_backward, sums, jnp.arange(1, plan.num_blocks))
    return jnp.moveaxis(jnp.concatenate([first_d_q[None], d_q]), 0, 1), d_k, d_v
