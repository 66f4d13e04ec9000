"""The band schedule of the blocked ``"xla"`` kernel (`model.kernels.xla`).

Query block ``b`` sees key blocks ``b .. b + views - 1`` (keys padded with ``left`` positions in
front); for each of these *views* one batched ``(block, d) x (d, block)`` matmul gives the
scores and a band mask makes them exact. Blocks go in chunks of ``plan.blocks_per_chunk``
under ``lax.map`` (forward) and ``lax.scan`` (backward), so that the live working set is one
chunk's scores. Relative position embeddings are added by Transformer-XL's skew (`_skew`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from model.kernels.common import masked_softmax_parts, soft_cap
from model.kernels.xla_plan import Plan, score_mask


def _skew(rel_scores: jax.Array, span: int) -> jax.Array:
    """``(..., block, W) -> (..., block, span)`` with ``out[a, s] = rel_scores[a, s - a]``.

    Turns scores against relative offsets into scores against key positions by the
    pad-and-reshape shift of Transformer-XL (no gather). Entries with ``s - a`` outside
    ``[0, W)`` hold junk; the band mask removes them.
    """
    *lead, block, width = rel_scores.shape
    padded = jnp.pad(rel_scores, [(0, 0)] * len(lead) + [(0, 0), (0, span + 1 - width)])
    flat = padded.reshape(*lead, block * (span + 1))[..., :block * span]
    return flat.reshape(*lead, block, span)


class _Chunk(NamedTuple):
    """The query blocks of one chunk and the key blocks they can see."""

    q: jax.Array  # (B, G, groups, block, d), scaled; groups: query heads per k/v
    k: jax.Array  # (B, G + views - 1, block, d); view j of query block g is key block g + j
    v: jax.Array  # (B, G + views - 1, block, d)
    visible: list[jax.Array]  # per view, bool (B, G, 1, block, block): band, key valid, segment


def _chunk(plan: Plan, index, q_blocks, k_blocks, v_blocks, key_valid, segments) -> _Chunk:
    count = plan.blocks_per_chunk
    first = index * count

    def rows(x, length):
        return lax.dynamic_slice_in_dim(x, first, length, axis=1)

    key_rows = functools.partial(rows, length=count + plan.views - 1)
    valid = key_rows(key_valid)
    q_segments, k_segments = (None, None) if segments is None else (
        rows(segments[0], count), key_rows(segments[1]))
    # Key position - query position: view j of a query block starts `left` before it.
    key_minus_query = (jnp.arange(plan.block)[None, :] - jnp.arange(plan.block)[:, None]
                       - plan.left)
    visible = []
    for view in range(plan.views):
        vis = score_mask(plan, key_minus_query + view * plan.block, valid[:, view:view + count],
                         q_segments, None if segments is None else
                         k_segments[:, view:view + count])
        visible.append(vis[:, :, None])  # the same for every query head of the group
    return _Chunk(rows(q_blocks, count), key_rows(k_blocks), key_rows(v_blocks), visible)


def _scores(plan: Plan, q, k, rel) -> list[jax.Array]:
    """Per view, float32 logits ``(B, G, groups, block, block)`` of the chunk's queries and
    keys (one matmul per view for all the query heads of a key/value head), soft-capped where
    ``plan.logit_soft_cap`` says (the relative positions' part included). The backward pass
    differentiates this function with ``jax.vjp``, the cap's derivative with it."""
    count = q.shape[1]
    scores = [
        jnp.einsum("bgpqd,bgkd->bgpqk", q, k[:, view:view + count], precision=plan.precision,
                   preferred_element_type=jnp.float32)
        for view in range(plan.views)
    ]
    if rel is not None:  # rel: (B, groups, width, d)
        rel_scores = jnp.einsum("bgpqd,bprd->bgpqr", q, rel, precision=plan.precision,
                                preferred_element_type=jnp.float32)
        skewed = _skew(rel_scores, plan.views * plan.block)
        scores = [s + skewed[..., view * plan.block:(view + 1) * plan.block]
                  for view, s in enumerate(scores)]
    return [soft_cap(s, plan.logit_soft_cap) for s in scores]


def _values(plan: Plan, weights, v) -> jax.Array:
    """``sum_view weights[view] @ v_view``: float32 ``(B, G, groups, block, d)``."""
    count = weights[0].shape[1]
    return sum(
        jnp.einsum("bgpqk,bgkd->bgpqd", w.astype(v.dtype), v[:, view:view + count],
                   precision=plan.precision, preferred_element_type=jnp.float32)
        for view, w in enumerate(weights))


def _dropout_keep(plan: Plan, dropout_rng, index, shape) -> list[jax.Array] | None:
    """Per view, the kept-weight multiplier (0 or 1/(1-rate)) of chunk ``index``."""
    if plan.dropout_rate == 0.0:
        return None
    keep = jax.random.bernoulli(jax.random.fold_in(dropout_rng, index),
                                1.0 - plan.dropout_rate, (plan.views, *shape))
    return list(keep.astype(jnp.float32) / (1.0 - plan.dropout_rate))


def band_forward(plan: Plan, q_blocks, k_blocks, v_blocks, key_valid, segments, rel,
                 dropout_rng):
    """The band schedule's output ``(B, num_blocks, groups, block, d)`` (q_blocks' dtype) and
    float32 log-sum-exp ``(B, num_blocks, groups, block)``, chunk by chunk."""

    def chunk_forward(index):
        chunk = _chunk(plan, index, q_blocks, k_blocks, v_blocks, key_valid, segments)
        exps, total, lse = masked_softmax_parts(_scores(plan, chunk.q, chunk.k, rel), chunk.visible)
        keep = _dropout_keep(plan, dropout_rng, index, total.shape + (plan.block,))
        if keep is not None:
            exps = [e * m for e, m in zip(exps, keep)]
        out = _values(plan, exps, chunk.v) / jnp.where(total > 0, total, 1.0)[..., None]
        return out.astype(q_blocks.dtype), lse

    out, lse = lax.map(chunk_forward, jnp.arange(plan.num_chunks))
    return _unchunk(out), _unchunk(lse)


def _unchunk(x: jax.Array) -> jax.Array:
    """``(chunks, B, G, ...) -> (B, chunks * G, ...)``."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])


def band_backward(plan: Plan, q_blocks, k_blocks, v_blocks, key_valid, segments, rel,
                  dropout_rng, lse, d_out, correction):
    """float32 gradients ``(d_q, d_k, d_v, d_rel)`` of the band schedule, chunk by chunk."""

    def chunk_backward(index):
        chunk = _chunk(plan, index, q_blocks, k_blocks, v_blocks, key_valid, segments)

        def rows(x):
            return lax.dynamic_slice_in_dim(x, index * plan.blocks_per_chunk,
                                            plan.blocks_per_chunk, axis=1)

        # The matmuls' backward comes from jax.vjp of the forward's own functions; only the
        # softmax backward is written out.
        scores, scores_vjp = jax.vjp(functools.partial(_scores, plan), chunk.q, chunk.k, rel)
        chunk_lse = rows(lse)[..., None]
        probs = [jnp.where(vis, jnp.exp(s - chunk_lse), 0.0)
                 for s, vis in zip(scores, chunk.visible)]
        keep = _dropout_keep(plan, dropout_rng, index, chunk_lse.shape[:-1] + (plan.block,))
        kept = probs if keep is None else [p * m for p, m in zip(probs, keep)]
        _, values_vjp = jax.vjp(functools.partial(_values, plan), kept, chunk.v)
        d_kept, d_v = values_vjp(rows(d_out))
        d_probs = d_kept if keep is None else [d * m for d, m in zip(d_kept, keep)]
        chunk_correction = rows(correction)[..., None]
        d_scores = [p * (d - chunk_correction) for p, d in zip(probs, d_probs)]
        d_q, d_k, d_rel = scores_vjp(d_scores)
        return d_q, d_k, d_v, d_rel

    def accumulate(sums, index):
        # Chunk c read key blocks [c * G, c * G + G + views - 1): its key and value gradients
        # are added there in place, so no per-chunk copy of that overlapping range is kept.
        d_q, d_k, d_v, d_rel = chunk_backward(index)
        first = index * plan.blocks_per_chunk

        def add_rows(total, part):
            window = lax.dynamic_slice_in_dim(total, first, part.shape[1], axis=1)
            return lax.dynamic_update_slice_in_dim(total, window + part, first, axis=1)

        d_k_sum, d_v_sum, d_rel_sum = sums
        sums = (add_rows(d_k_sum, d_k), add_rows(d_v_sum, d_v),
                None if rel is None else d_rel_sum + d_rel)
        return sums, d_q

    zeros = functools.partial(jnp.zeros, dtype=jnp.float32)
    sums = (zeros(k_blocks.shape), zeros(v_blocks.shape), None if rel is None else zeros(rel.shape))
    # Chunk 0 outside the scan gives the sums the types of the gradients (under shard_map they
    # vary over mesh axes, which the scan's carry must already do).
    sums, first_d_q = accumulate(sums, 0)
    (d_k, d_v, d_rel), d_q = lax.scan(accumulate, sums, jnp.arange(1, plan.num_chunks))
    return _unchunk(jnp.concatenate([first_d_q[None], d_q])), d_k, d_v, d_rel
