"""The ``"cudnn"`` implementation: cuDNN's fused sliding-window flash attention (NVIDIA GPUs),
with packed documents in cuDNN's ragged layout (`packed_layout`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from errors import UserError
from model.kernels.common import per_row_segments, reject_unsupported, target_backend


def packed_layout(segment_ids: jax.Array, max_segments: int):
    """cuDNN's packed (ragged) layout of ``(batch, n)`` segment ids: ``(lengths, offsets)``,
    int32 ``(batch, max_segments)`` and ``(batch, max_segments + 1)``.

    Segment ``m`` of a row is its m-th run of equal ids: it starts at ``offsets[m]`` and holds
    ``lengths[m]`` positions; unused slots hold -1 (cuDNN's convention)."""
    batch, seq_len = segment_ids.shape
    starts = jnp.concatenate([jnp.ones((batch, 1), bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    offsets = jax.vmap(lambda row: jnp.nonzero(row, size=max_segments, fill_value=-1)[0])(starts)
    offsets = offsets.astype(jnp.int32)
    following = jnp.concatenate([offsets[:, 1:], jnp.full((batch, 1), -1, jnp.int32)], axis=1)
    lengths = jnp.where(offsets >= 0, jnp.where(following >= 0, following, seq_len) - offsets, -1)
    return lengths, jnp.concatenate([offsets, jnp.full((batch, 1), -1, jnp.int32)], axis=1)


# jax before 0.11.1 strides the packed layout's key/value offsets by the number of query heads
# (`_fix_seqlen_offsets` in jax/_src/cudnn/fused_attention_stablehlo.py: ``kv_offsets * N * H``;
# fixed by jax PR 39521, first released in 0.11.1): with fewer k/v heads than query heads and
# packed documents, cuDNN reads keys and values from the wrong places, and no error says so.
PACKED_GROUPED_HEADS_FIXED_IN = (0, 11, 1)


def repeat_key_value_heads(k: jax.Array, v: jax.Array, query_heads: int):
    """``k`` and ``v``, ``(batch, n, kv_heads, d)``, with each head repeated for the
    ``query_heads // kv_heads`` query heads it serves (query head ``h`` reads k/v head
    ``h // group``, jax.nn.dot_product_attention's grouping): the layout that the packed
    attention of a jax before `PACKED_GROUPED_HEADS_FIXED_IN` computes correctly, at the cost
    of the memory of full k/v heads."""
    group = query_heads // k.shape[2]
    return (k, v) if group == 1 else (jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2))


def cudnn_local_attention(q, k, v, mask, rel_pos_emb, window_size_left, window_size_right,
                          dropout_rate, dropout_rng, segment_ids, *, block_size, precision,
                          max_segments, scale, logit_soft_cap):
    """cuDNN's fused flash attention with its sliding-window mask (NVIDIA GPUs). It skips the
    key blocks outside the window, so time and memory stay linear in the sequence length; on
    an H100 it runs about 20× faster than the blocked kernel (docs/benchmarks.md). Segment ids go
    to cuDNN's packed layout (each run of equal ids is one sequence), derived here inside the
    jitted computation, with ``max_segments`` slots per row.

    Takes `model.local_attention`'s arguments (checked there) and returns its
    ``(..., seq_len, head_dim)`` in q's dtype. A one-line `UserError` for a mask, rel_pos_emb,
    dropout, a logit soft-cap (jax's cuDNN attention has none), a right window, segment ids
    without ``max_segments`` or differing per head, a backend other than an NVIDIA GPU, or
    inputs other than bfloat16/float16. On a jax before
    0.11.1, grouped k/v heads with segment ids are repeated to the query heads first
    (`PACKED_GROUPED_HEADS_FIXED_IN`)."""
    del dropout_rng, block_size, precision
    extra = [f"window_size_right={window_size_right} (it computes causal windows)"] * bool(
        window_size_right)
    if segment_ids is not None and max_segments is None:
        extra.append("segment_ids without max_segments (its packed layout needs the bound)")
    if logit_soft_cap is not None:
        extra.append(f"logit_soft_cap={logit_soft_cap} (jax's cuDNN attention has no cap)")
    reject_unsupported("cudnn", mask, rel_pos_emb, dropout_rate, extra)
    if target_backend() != "gpu":
        raise UserError(f"implementation='cudnn' needs an NVIDIA GPU; the backend is "
                        f"{target_backend()!r}: use implementation='xla' or 'auto'")
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise UserError(f"implementation='cudnn' needs bfloat16 or float16 inputs; got {q.dtype}")
    *lead, seq_len, head_dim = k.shape

    def to_bnhd(x):
        """``(..., heads, n, d) -> (batch, n, heads, d)``, the layout of
        jax.nn.dot_product_attention; cuDNN groups query heads over fewer k/v heads natively."""
        heads = x.shape[-3] if x.ndim >= 3 else 1
        return jnp.swapaxes(x.reshape(-1, heads, seq_len, head_dim), 1, 2)

    if segment_ids is None:
        # A window over the whole sequence (a global layer) is plain causal flash attention.
        out = jax.nn.dot_product_attention(
            to_bnhd(q), to_bnhd(k), to_bnhd(v), scale=scale, is_causal=True,
            local_window_size=None if window_size_left >= seq_len - 1 else (window_size_left, 0),
            implementation="cudnn")
    else:
        # The packed layout is only in JAX's cuDNN module (jax.nn does not expose it).
        from jax._src.cudnn import fused_attention_stablehlo as cudnn

        lengths, offsets = packed_layout(per_row_segments(segment_ids, tuple(lead), seq_len),
                                          max_segments)
        k, v = to_bnhd(k), to_bnhd(v)
        if jax.__version_info__ < PACKED_GROUPED_HEADS_FIXED_IN:
            k, v = repeat_key_value_heads(k, v, q.shape[-3] if q.ndim >= 3 else 1)
        out = cudnn.dot_product_attention(
            to_bnhd(q), k, v, None, None, lengths, lengths, offsets, offsets,
            scale=head_dim ** -0.5 if scale is None else scale,
            mask_type=cudnn.MaskType.PADDING_CAUSAL, qkv_layout="BTNH",
            sliding_window_length=min(window_size_left, seq_len - 1) + 1)
    return jnp.swapaxes(out, 1, 2).reshape(q.shape)
