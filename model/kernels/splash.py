"""The ``"splash"`` implementation: the Pallas splash attention kernel of TPUs with a local
mask (Pallas interpret mode on other backends: exact but slow, for tests). The backend is
`model.kernels.common.target_backend`'s: lowered for a TPU from a CPU, it is the real kernel."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from model.kernels.common import (NO_SEGMENT, grouped, pad_sequence, per_row_segments,
                                  query_groups, reject_unsupported, round_up, target_backend)


@functools.lru_cache(maxsize=32)
def _splash_kernel(padded_len: int, groups: int, left: int, right: int, block: int,
                   logit_soft_cap: float | None, interpret: bool, mesh):
    """A multi-query splash attention kernel, ``groups`` query heads against one key/value
    head, with a local mask, causal where the window spans the sequence, and the logit
    soft-cap ``cap · tanh(s / cap)`` where ``logit_soft_cap`` is set (the kernel's
    ``attn_logits_soft_cap``). Built once per static shape and abstract ``mesh`` in scope: its
    mask preprocessing runs in numpy, and its tables belong to that mesh, which under
    shard_map is the manual one."""
    del mesh  # a cache key
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    shape = (padded_len, padded_len)
    whole = right == 0 and left >= padded_len - 1
    mask = splash.MultiHeadMask(
        [splash.CausalMask(shape) if whole else splash.LocalMask(shape, (left, right), offset=0)]
        * groups)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                              block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                              block_q_dq=block, block_kv_dq=block)
    # Its mask tables are concrete arrays, not values of the trace that first asks for the
    # kernel (under shard_map they would be, and the cached kernel would leak them).
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mqa(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                      attn_logits_soft_cap=logit_soft_cap, interpret=interpret)


def splash_local_attention(q, k, v, mask, rel_pos_emb, window_size_left, window_size_right,
                           dropout_rate, dropout_rng, segment_ids, *, block_size, precision,
                           max_segments, scale, logit_soft_cap):
    """The Pallas splash attention kernel of TPUs with a local mask and segment ids: it skips
    the blocks outside the window, in the forward and the backward pass. On other backends
    it runs in Pallas interpret mode (exact, slow: how the tests check it on a CPU).

    Takes `model.local_attention`'s arguments (checked there; ``block_size``: the kernel's
    block, a multiple of 128, default 512 or the sequence rounded up to 128) and returns its
    ``(..., seq_len, head_dim)`` in q's dtype. A one-line `UserError` for a mask,
    rel_pos_emb or dropout, or segment ids that differ per head."""
    del dropout_rng, precision, max_segments
    reject_unsupported("splash", mask, rel_pos_emb, dropout_rate)
    groups = query_groups(q, k)
    *lead, seq_len, head_dim = k.shape
    kv_heads = lead[-1] if lead else 1
    # Blocks of 512 (multiples of 128, the TPU lane width); the sequence is padded to whole
    # blocks, the padding keys hidden from every real query by their segment id, NO_SEGMENT.
    block = block_size or min(512, round_up(seq_len, 128))
    padded_len = round_up(seq_len, block)
    kernel = _splash_kernel(padded_len, groups, min(window_size_left, padded_len),
                            min(window_size_right, padded_len), block, logit_soft_cap,
                            interpret=target_backend() != "tpu",
                            mesh=jax.sharding.get_abstract_mesh())
    if segment_ids is None:
        ids = jnp.zeros((math.prod(lead[:-1]), seq_len), jnp.int32)
    else:
        ids = per_row_segments(segment_ids, tuple(lead), seq_len)
    # One row per key/value head (the ids are shared by all heads).
    ids = pad_sequence(jnp.repeat(ids, kv_heads, axis=0), 0, padded_len - seq_len,
                       value=NO_SEGMENT)

    def padded(x):  # zero-pads the sequence axis (-2)
        return pad_sequence(x, 0, padded_len - seq_len, axis=-2)

    # The kernel takes one key/value head and its groups of query heads:
    # q (batch·kv_heads, groups, padded n, d), k, v (batch·kv_heads, padded n, d). The kernel
    # has no scale: it goes into q, so that the cap sees the scaled logits.
    scaled_q = (q * (head_dim ** -0.5 if scale is None else scale)).astype(q.dtype)
    keys = lambda x: padded(x.reshape(-1, seq_len, head_dim))  # noqa: E731

    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    out = jax.vmap(lambda q, k, v, ids: kernel(q, k, v, segment_ids=SegmentIds(q=ids, kv=ids)))(
        padded(grouped(scaled_q, groups)), keys(k), keys(v), ids)
    return out[:, :, :seq_len].reshape(q.shape).astype(q.dtype)
