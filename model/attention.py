"""Exact sliding-window (local) attention in O(n·w) time and O(n·d) memory.

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

The views of one query block hold every key it can see, so its softmax is exact in one pass
over them: the row maximum is taken over all views before exponentiating, which is what an
online (running max and sum) softmax converges to, without the rescaling.

A window over at least half the sequence (a global layer's) runs the looped schedule instead
(``_Plan.loop_over_key_blocks``): most of the band's views would lie before position 0 or past
the end, so each query block loops over only the key blocks its window reaches, with an online
softmax (see `_looped_forward`). A whole-sequence causal window computes ~N²/2 block pairs, not
the band's N·(N + 1). Relative position embeddings keep the band schedule.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

# Scores per chunk (batch·heads × chunk queries × visible key blocks) that the automatic
# chunk size aims for: 2**21 float32 = 8 MiB, which measured fastest on CPU (bench/attention.py)
# and keeps the working set negligible on accelerators.
_CHUNK_SCORES = 2**21


class _Plan(NamedTuple):
    """Static tiling of one call; hashable so it can be a ``custom_vjp`` non-diff argument."""

    # False: the band schedule (each query block against its ``views`` key blocks in one
    # pass). True: each query block loops over only the key blocks its window reaches
    # (windows about as wide as the sequence, where most of the band lies outside it).
    loop_over_key_blocks: bool
    seq_len: int  # of the keys
    # The queries are positions [query_offset, query_offset + query_len) of the keys' sequence
    # (all of it, except under context parallelism, where a device's queries see keys before
    # its own block); only the looped schedule takes a part.
    query_len: int
    query_offset: int
    left: int  # window sizes clamped to seq_len - 1 (a longer window sees nothing more)
    right: int
    rel_offset: int  # row of rel_pos_emb for j - i = -left (the clamp drops rows before it)
    block: int
    blocks_per_chunk: int
    num_chunks: int
    dropout_rate: float
    precision: lax.PrecisionLike

    @property
    def views(self) -> int:
        return _views(self.block, self.left, self.right)

    @property
    def num_blocks(self) -> int:
        return self.blocks_per_chunk * self.num_chunks

    @property
    def padded_len(self) -> int:
        return self.block * self.num_blocks

    @property
    def keys_before(self) -> int:
        """Padding keys in front of position 0: the band schedule's views start at ``-left``."""
        return 0 if self.loop_over_key_blocks else self.left

    @property
    def padded_keys(self) -> int:
        if self.loop_over_key_blocks:
            return _round_up(self.seq_len, self.block)
        return self.block * (self.num_blocks + self.views - 1)


def _views(block: int, left: int, right: int) -> int:
    """Key blocks a query block can see."""
    return -(-(block + left + right) // block)


def _default_block(window: int) -> int:
    """Half the window, as a power of two in [16, 128]: measured fastest on CPU for w = 257.

    Larger blocks run faster matmuls but compute more masked-out scores
    (a fraction ``block / (block + window)``)."""
    return 1 << max(4, min(7, (window // 2).bit_length() - 1))


def _make_plan(
    batch: int,
    seq_len: int,
    window_size_left: int,
    window_size_right: int,
    block_size: int | None,
    dropout_rate: float,
    precision: lax.PrecisionLike,
    has_rel_pos_emb: bool = False,
    query_len: int | None = None,
    query_offset: int = 0,
) -> _Plan:
    query_len = seq_len if query_len is None else query_len
    if has_rel_pos_emb and (query_len, query_offset) != (seq_len, 0):
        raise ValueError("queries at an offset into the keys need rel_pos_emb=None: only the "
                         "looped schedule takes them, and it has no relative positions")
    left = min(window_size_left, seq_len - 1)
    right = min(window_size_right, seq_len - 1)
    # A window over at least half the sequence (a global layer's is all of it) loops over the
    # key blocks each query block reaches: the band would compute about as many blocks
    # again that lie wholly before position 0 or past the end. Relative positions keep the
    # band (its skew covers the window in one pass). Queries that are only a part of the
    # keys' sequence loop too.
    loop = not has_rel_pos_emb and (2 * (left + right + 1) >= seq_len or query_len != seq_len)
    if loop:
        block = min(block_size or _default_loop_block(batch), _round_up(query_len, 8))
        num_blocks = -(-query_len // block)
        blocks_per_chunk, num_chunks = 1, num_blocks
    else:
        block = min(block_size or _default_block(left + right + 1), _round_up(seq_len, 8))
        num_blocks = -(-seq_len // block)
        visible_keys = block * _views(block, left, right)
        blocks_per_chunk = max(1, min(num_blocks,
                                      _CHUNK_SCORES // (batch * block * visible_keys)))
        num_chunks = -(-num_blocks // blocks_per_chunk)
        # Spread the blocks evenly over the chunks so that padding stays under one chunk.
        blocks_per_chunk = -(-num_blocks // num_chunks)
    return _Plan(
        loop_over_key_blocks=loop,
        seq_len=seq_len,
        query_len=query_len,
        query_offset=query_offset,
        left=left,
        right=right,
        rel_offset=window_size_left - left,
        block=block,
        blocks_per_chunk=blocks_per_chunk,
        num_chunks=num_chunks,
        dropout_rate=float(dropout_rate),
        precision=precision,
    )


def _default_loop_block(batch: int) -> int:
    """The looped schedule's block: 128, halved while the ``(block, block)`` scores of the
    whole batch exceed ``_CHUNK_SCORES``. Forward+backward of a causal window over 8192
    positions (6 heads, head_dim 64, float32, one CPU core) took 1.52 s with 128, 1.66 s with
    64, 1.63 s with 256 and 2.61 s with 512 (11.9 s with the band schedule)."""
    block = 128
    while block > 16 and batch * block * block > _CHUNK_SCORES:
        block //= 2
    return block


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def local_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None = None,
    rel_pos_emb: jax.Array | None = None,
    window_size_left: int = 128,
    window_size_right: int = 128,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    *,
    implementation: str = "auto",
    block_size: int | None = None,
    precision: lax.PrecisionLike = None,
    max_segments: int | None = None,
) -> jax.Array:
    """Exact local (sliding-window) attention.

    Query ``i`` attends key ``j`` iff ``i - window_size_left <= j <= i + window_size_right``,
    ``mask[..., j]`` is true and ``segment_ids[..., i] == segment_ids[..., j]``. A causal
    language model uses ``window_size_right=0``: each query sees itself and
    ``window_size_left`` earlier keys. (The original ``local_attention_flax`` used the
    half-open window ``[i - left, i + right - 1]``, so with ``window_size_right=0`` a query
    could not see itself; here both ends are inclusive.)

    Args:
      q: ``(..., heads, seq_len, head_dim)`` (or ``(seq_len, head_dim)``), a floating dtype
        (float32 or bfloat16); leading axes are typically ``(batch, heads)``.
      k, v: ``(..., kv_heads, seq_len, head_dim)``, q's dtype, where ``kv_heads`` divides
        ``heads``: grouped-query attention (1: multi-query), query head ``h`` attends key/value
        head ``h // (heads / kv_heads)``. The kernels group the query heads of one key/value
        head together; k and v are never copied per query head.
      mask: optional key padding mask, bool, broadcastable to ``(..., kv_heads, seq_len)``
        (k's leading shape); false keys are never attended.
      rel_pos_emb: optional learned relative position embeddings,
        ``(window_size_left + window_size_right + 1, head_dim)`` or with leading axes that
        broadcast against q's (e.g. ``(heads, 1 + left + right, head_dim)`` for
        ``(batch, heads, ...)`` inputs). Row ``j - i + window_size_left`` is added to the key:
        ``logit(i, j) = q_i · (k_j + rel_pos_emb[j - i + window_size_left]) / sqrt(head_dim)``.
      window_size_left, window_size_right: non-negative ints (static). Windows longer than
        the sequence are allowed.
      dropout_rate: dropout on the attention weights; needs ``dropout_rng`` when positive.
        The same key gives the same output (the mask depends on the key and the static tiling).
      dropout_rng: a PRNG key.
      segment_ids: optional int ids, broadcastable to ``(..., kv_heads, seq_len)``, for packed
        documents: attention never crosses a segment boundary.
      implementation: ``"auto"`` (default), the fastest exact path for this call (see
        `resolve_implementation`: ``cudnn`` on NVIDIA GPUs, ``splash`` on TPUs where they
        support the call's features, else ``xla``; ``xla`` on CPUs); ``"xla"``, the blocked
        algorithm of this module (any backend, every feature); ``"dense"``,
        ``jax.nn.dot_product_attention`` over the full (n, n) scores (O(n²): a baseline,
        without rel_pos_emb or dropout); ``"cudnn"``, cuDNN's fused sliding-window flash
        attention (NVIDIA GPUs, bfloat16/float16, causal windows; segment_ids need
        ``max_segments``; no mask, rel_pos_emb or dropout); ``"splash"``, the Pallas splash
        attention kernel of TPUs (Pallas interpret mode elsewhere, which is slow: for tests;
        no mask, rel_pos_emb or dropout). An explicit name that cannot run the call is a
        one-line ValueError.
      block_size: query block length (static); by default chosen from the window.
      precision: matmul precision, as for ``jnp.einsum``.
      max_segments: static bound on the segments (documents) in one row of ``segment_ids``,
        for ``cudnn``, whose packed layout needs it. Segments are the contiguous runs of equal
        ids, as packing makes them; a row with more runs is not computed exactly, so the caller
        checks its data (train.py does, batch by batch).

    Returns:
      ``(..., seq_len, head_dim)`` in q's dtype. Scores and softmax are computed in float32. A
      query that sees no key (all masked) gets zeros.
    """
    _check_arguments(q, k, v, mask, rel_pos_emb, window_size_left, window_size_right,
                     dropout_rate, dropout_rng, segment_ids)
    if block_size is not None and (isinstance(block_size, bool) or block_size < 1
                                   or not isinstance(block_size, numbers.Integral)):
        raise ValueError(f"block_size={block_size!r}: expected a positive int or None")
    if max_segments is not None and (isinstance(max_segments, bool) or max_segments < 1
                                     or not isinstance(max_segments, numbers.Integral)):
        raise ValueError(f"max_segments={max_segments!r}: expected a positive int or None")
    implementation = resolve_implementation(
        implementation, q.dtype, has_mask=mask is not None,
        has_rel_pos_emb=rel_pos_emb is not None, dropout_rate=dropout_rate,
        window_size_right=window_size_right, has_segment_ids=segment_ids is not None,
        max_segments=max_segments)
    return _IMPLEMENTATIONS[implementation](
        q, k, v, mask, rel_pos_emb, int(window_size_left), int(window_size_right),
        dropout_rate, dropout_rng, segment_ids, block_size=block_size, precision=precision,
        max_segments=max_segments)


def resolve_implementation(implementation: str, dtype, *, has_mask: bool = False,
                           has_rel_pos_emb: bool = False, dropout_rate: float = 0.0,
                           window_size_right: int = 0, has_segment_ids: bool = False,
                           max_segments: int | None = None, backend: str | None = None) -> str:
    """The implementation that `local_attention` runs for a call with these features.

    ``"auto"`` picks the fastest exact path on ``backend`` (default: JAX's default backend):
    on GPUs ``cudnn`` (20× ``xla`` on an H100, see the README) where the call has a causal
    window, bfloat16/float16 inputs, no mask, relative positions or dropout, and either no
    segment ids or a ``max_segments`` bound; on TPUs ``splash`` where the call has no mask,
    relative positions or dropout; otherwise ``xla`` (always on CPUs, where it is fastest).
    Other names come back unchanged; an unknown one is a one-line ValueError.
    """
    if implementation not in _IMPLEMENTATIONS and implementation != "auto":
        raise ValueError(
            f"implementation={implementation!r} is not available; expected one of "
            f"{['auto', *sorted(_IMPLEMENTATIONS)]}")
    if implementation != "auto":
        return implementation
    backend = backend or jax.default_backend()
    kernel_features = not (has_mask or has_rel_pos_emb or dropout_rate > 0.0)
    if backend == "gpu" and kernel_features and window_size_right == 0 \
            and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) \
            and (not has_segment_ids or max_segments is not None):
        return "cudnn"
    if backend == "tpu" and kernel_features:
        return "splash"
    return "xla"


def _check_arguments(q, k, v, mask, rel_pos_emb, window_size_left, window_size_right,
                     dropout_rate, dropout_rng, segment_ids) -> None:
    """One-line ValueErrors for shapes and values a caller can get wrong."""
    if q.ndim < 2 or k.shape != v.shape or q.ndim != k.ndim or q.shape[-2:] != k.shape[-2:] \
            or q.shape[:-3] != k.shape[:-3] or _query_groups(q, k) is None:
        raise ValueError(
            "local_attention expects q (..., heads, seq_len, head_dim) and k, v (..., kv_heads, "
            "seq_len, head_dim) with kv_heads dividing heads and the other axes equal; got "
            f"q {q.shape}, k {k.shape}, v {v.shape}")
    if q.shape[-2] == 0:
        raise ValueError(f"local_attention expects at least one position; got q {q.shape}")
    if not jnp.issubdtype(q.dtype, jnp.floating):
        raise ValueError(f"local_attention expects floating q, k, v; got dtype {q.dtype}")
    for name, size in (("window_size_left", window_size_left),
                       ("window_size_right", window_size_right)):
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 0:
            raise ValueError(f"{name}={size!r}: expected a non-negative int")
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate={dropout_rate!r}: expected a float in [0, 1)")
    if dropout_rate > 0.0 and dropout_rng is None:
        raise ValueError(f"dropout_rate={dropout_rate} needs a dropout_rng (a PRNG key)")
    lead, seq_len = k.shape[:-2], k.shape[-2]
    for name, array in (("mask", mask), ("segment_ids", segment_ids)):
        if array is not None and (
                array.ndim == 0 or array.shape[-1] != seq_len
                or not _broadcasts(array.shape[:-1], lead)):
            raise ValueError(
                f"{name} has shape {array.shape}; expected a shape broadcastable to "
                f"{lead + (seq_len,)} (one entry per key)")
    if rel_pos_emb is not None:
        width = window_size_left + window_size_right + 1
        if (rel_pos_emb.ndim < 2 or rel_pos_emb.shape[-2:] != (width, q.shape[-1])
                or not _broadcasts(rel_pos_emb.shape[:-2], q.shape[:-2])):
            raise ValueError(
                f"rel_pos_emb has shape {rel_pos_emb.shape}; expected (..., {width}, "
                f"{q.shape[-1]}) = (window_size_left + window_size_right + 1, head_dim)")


def _query_groups(q: jax.Array, k: jax.Array) -> int | None:
    """Query heads per key/value head (axis -3; 1 without a heads axis), None if they do not
    divide."""
    if q.ndim < 3:
        return 1
    heads, kv_heads = q.shape[-3], k.shape[-3]
    return heads // kv_heads if kv_heads and heads % kv_heads == 0 else None


def _grouped(x: jax.Array, groups: int) -> jax.Array:
    """``(..., heads, *rest) -> (prod(...) * kv_heads, groups, *rest)``, query heads next to
    the others of their key/value head (a reshape: no copy)."""
    if x.ndim < 3:
        return x[None, None]
    return x.reshape(-1, groups, *x.shape[-2:])


def _broadcasts(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    if len(shape) > len(target):
        return False
    return all(s in (1, t) for s, t in zip(shape[::-1], target[::-1]))


def _xla_local_attention(q, k, v, mask, rel_pos_emb, window_size_left, window_size_right,
                         dropout_rate, dropout_rng, segment_ids, *, block_size, precision,
                         max_segments, query_offset=0):
    """Blocked local attention in plain XLA: pads and flattens, then runs the custom-vjp core.

    ``query_offset`` (static; for model/context_parallel.py): q may hold only the positions
    ``[query_offset, query_offset + q_len)`` of k and v's sequence (then without
    rel_pos_emb); ``mask`` and ``segment_ids`` describe the keys. The output has q's shape."""
    del max_segments  # segment ids of any kind are exact here
    groups = _query_groups(q, k)
    *lead, seq_len, head_dim = k.shape
    query_len = q.shape[-2]
    if query_offset + query_len > seq_len:
        raise ValueError(f"queries [{query_offset}, {query_offset + query_len}) must lie in the "
                         f"keys' sequence of {seq_len}")
    batch = math.prod(lead)  # one row per key/value head; its query heads are its groups
    plan = _make_plan(batch * groups, seq_len, window_size_left, window_size_right, block_size,
                      dropout_rate, precision, has_rel_pos_emb=rel_pos_emb is not None,
                      query_len=query_len, query_offset=query_offset)

    def flat(x, trailing):
        return jnp.broadcast_to(x, (*lead, *trailing)).reshape(batch, *trailing)

    # Queries are padded at the end to whole chunks. Keys get `left` positions in front, so that
    # query block b's window starts in key block b, and enough after for the last block's views.
    # Padding keys are marked invalid. The query heads of one key/value head share its key
    # blocks: query blocks are (batch, num_blocks, groups, block, head_dim).
    q_rows = _grouped(q * (head_dim ** -0.5), groups)  # (batch, groups, query_len, head_dim)
    q_rows = jnp.pad(q_rows, [(0, 0), (0, 0), (0, plan.padded_len - query_len), (0, 0)])
    q_blocks = jnp.moveaxis(q_rows.reshape(batch, groups, plan.num_blocks, plan.block, head_dim),
                            1, 2)
    key_pad = (plan.keys_before, plan.padded_keys - plan.keys_before - seq_len)
    k_pad = _pad_seq(flat(k, (seq_len, head_dim)), *key_pad)
    v_pad = _pad_seq(flat(v, (seq_len, head_dim)), *key_pad)
    key_valid = jnp.ones((batch, seq_len), bool) if mask is None else flat(mask.astype(bool), (seq_len,))
    key_valid = _pad_seq(key_valid, *key_pad)
    segments = None
    if segment_ids is not None:
        ids = flat(segment_ids.astype(jnp.int32), (seq_len,))
        query_ids = ids[:, query_offset:query_offset + query_len]
        segments = (_pad_seq(query_ids, 0, plan.padded_len - query_len),
                    _pad_seq(ids, *key_pad))
    rel = None
    if rel_pos_emb is not None:
        width = plan.left + plan.right + 1
        rel = rel_pos_emb[..., plan.rel_offset:plan.rel_offset + width, :].astype(q.dtype)
        rel = _grouped(jnp.broadcast_to(rel, (*q.shape[:-2], width, head_dim)), groups)
    blocks = functools.partial(_to_blocks, block=plan.block)
    if segments is not None:
        segments = tuple(map(blocks, segments))
    out = _blocked_attention(plan, q_blocks, blocks(k_pad), blocks(v_pad), blocks(key_valid),
                             segments, rel, dropout_rng)  # (batch, num_blocks, groups, block, d)
    out = jnp.moveaxis(out, 2, 1).reshape(batch, groups, plan.padded_len, head_dim)
    return out[:, :, :query_len].reshape(q.shape)


def _pad_seq(x: jax.Array, before: int, after: int) -> jax.Array:
    """Zero-pads axis 1 (the sequence axis of a flattened ``(batch, seq, ...)`` array)."""
    widths = [(0, 0)] * x.ndim
    widths[1] = (before, after)
    return jnp.pad(x, widths)


def _to_blocks(x: jax.Array, block: int) -> jax.Array:
    """``(batch, n, ...) -> (batch, n / block, block, ...)``."""
    return x.reshape(x.shape[0], x.shape[1] // block, block, *x.shape[2:])


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


def masked_softmax_parts(
    scores: Sequence[jax.Array], visible: Sequence[jax.Array]
) -> tuple[list[jax.Array], jax.Array, jax.Array]:
    """A softmax over the concatenated last axes of ``scores`` restricted to ``visible``.

    Args:
      scores: pieces ``(..., k_p)`` of one row of logits each, float32.
      visible: bool masks broadcastable to the pieces.

    Returns:
      ``(exps, total, lse)``: the pieces' ``exp(score - row max)`` (zero where not visible),
      their sum over the row ``(...)``, and the log-sum-exp ``(...)``. A row with nothing
      visible has ``total == 0`` and ``lse == +inf``, so that ``exp(score - lse)`` recomputes
      zeros, never NaN.
    """
    masked = [jnp.where(vis, s, -jnp.inf) for s, vis in zip(scores, visible)]
    row_max = functools.reduce(jnp.maximum, [m.max(axis=-1) for m in masked])
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    exps = [jnp.exp(m - row_max[..., None]) for m in masked]
    total = sum(e.sum(axis=-1) for e in exps)
    lse = jnp.where(total > 0, row_max + jnp.log(total), jnp.inf)
    return exps, total, lse


class _Chunk(NamedTuple):
    """The query blocks of one chunk and the key blocks they can see."""

    q: jax.Array  # (B, G, groups, block, d), scaled by 1/sqrt(d); groups: query heads per k/v
    k: jax.Array  # (B, G + views - 1, block, d); view j of query block g is key block g + j
    v: jax.Array  # (B, G + views - 1, block, d)
    visible: list[jax.Array]  # per view, bool (B, G, 1, block, block): band, key valid, segment


def _visible(plan: _Plan, key_minus_query, key_valid, query_segments, key_segments):
    """Which scores count, bool ``(..., block, block)``: the key lies in the query's window
    (``key_minus_query``, int ``(block, block)``), is valid (``key_valid``, bool
    ``(..., block)``) and in the query's segment (int ``(..., block)`` each, or None)."""
    vis = ((key_minus_query >= -plan.left) & (key_minus_query <= plan.right)
           & key_valid[..., None, :])
    if query_segments is not None:
        vis = vis & (query_segments[..., :, None] == key_segments[..., None, :])
    return vis


def _chunk(plan: _Plan, index, q_blocks, k_blocks, v_blocks, key_valid, segments) -> _Chunk:
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
        vis = _visible(plan, key_minus_query + view * plan.block, valid[:, view:view + count],
                       q_segments, None if segments is None else
                       k_segments[:, view:view + count])
        visible.append(vis[:, :, None])  # the same for every query head of the group
    return _Chunk(rows(q_blocks, count), key_rows(k_blocks), key_rows(v_blocks), visible)


def _scores(plan: _Plan, q, k, rel) -> list[jax.Array]:
    """Per view, float32 logits ``(B, G, groups, block, block)`` of the chunk's queries and
    keys (one matmul per view for all the query heads of a key/value head)."""
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
    return scores


def _values(plan: _Plan, weights, v) -> jax.Array:
    """``sum_view weights[view] @ v_view``: float32 ``(B, G, groups, block, d)``."""
    count = weights[0].shape[1]
    return sum(
        jnp.einsum("bgpqk,bgkd->bgpqd", w.astype(v.dtype), v[:, view:view + count],
                   precision=plan.precision, preferred_element_type=jnp.float32)
        for view, w in enumerate(weights))


def _dropout_keep(plan: _Plan, dropout_rng, index, shape) -> list[jax.Array] | None:
    """Per view, the kept-weight multiplier (0 or 1/(1-rate)) of chunk ``index``."""
    if plan.dropout_rate == 0.0:
        return None
    keep = jax.random.bernoulli(jax.random.fold_in(dropout_rng, index),
                                1.0 - plan.dropout_rate, (plan.views, *shape))
    return list(keep.astype(jnp.float32) / (1.0 - plan.dropout_rate))


def _forward(plan: _Plan, q_blocks, k_blocks, v_blocks, key_valid, segments, rel, dropout_rng):
    """Returns the output ``(B, num_blocks, groups, block, d)`` and the log-sum-exp
    ``(B, num_blocks, groups, block)``."""
    if plan.loop_over_key_blocks:
        return _looped_forward(plan, q_blocks, k_blocks, v_blocks, key_valid, segments,
                               dropout_rng)

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


# The looped schedule (``plan.loop_over_key_blocks``): query block b visits only key blocks
# `_key_block_range` (b), in a loop with a traced trip count, carrying an online softmax
# (FlashAttention's running maximum, sum and output). A whole-sequence causal window thus
# computes the ~N²/2 block pairs on and below the diagonal, not the band's N·(N + 1). Keys
# are not padded in front: key block j holds positions [j·block, (j + 1)·block).


def _key_block_range(plan: _Plan, query_block):
    """The first and last key block (int32 scalars) that query block ``query_block`` sees."""
    first_query = plan.query_offset + query_block * plan.block
    first_key = jnp.maximum(first_query - plan.left, 0)
    last_key = jnp.minimum(first_query + plan.block - 1 + plan.right, plan.seq_len - 1)
    return first_key // plan.block, last_key // plan.block


def _block_pair(plan: _Plan, query_block, key_block, q_blocks, k_blocks, key_valid, segments,
                dropout_rng):
    """Query block ``query_block`` against key block ``key_block``: float32 scores
    ``(B, groups, block, block)``, which of them are visible (bool ``(B, 1, block, block)``)
    and the dropout multiplier of the weights (float32, as the scores; None without
    dropout)."""
    row = functools.partial(lax.dynamic_index_in_dim, axis=1, keepdims=False)
    q, k = row(q_blocks, query_block), row(k_blocks, key_block)
    scores = jnp.einsum("bpqd,bkd->bpqk", q, k, precision=plan.precision,
                        preferred_element_type=jnp.float32)
    positions = jnp.arange(plan.block)
    key_minus_query = ((key_block - query_block) * plan.block - plan.query_offset
                       + positions[None, :] - positions[:, None])
    visible = _visible(plan, key_minus_query, row(key_valid, key_block),
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


def _looped_forward(plan: _Plan, q_blocks, k_blocks, v_blocks, key_valid, segments,
                    dropout_rng):
    """`_forward` of the looped schedule."""
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


def _looped_backward(plan: _Plan, q_blocks, k_blocks, v_blocks, key_valid, segments,
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
            d_scores = (probs * (d_probs - block_correction)).astype(q.dtype)
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
        d_q, d_k, d_v = _looped_backward(plan, q_blocks, k_blocks, v_blocks, key_valid,
                                         segments, dropout_rng, lse, d_out, correction)
        d_rel = None
    else:
        d_q, d_k, d_v, d_rel = _band_backward(plan, q_blocks, k_blocks, v_blocks, key_valid,
                                              segments, rel, dropout_rng, lse, d_out,
                                              correction)
    return (d_q.astype(q_blocks.dtype), d_k.astype(k_blocks.dtype),
            d_v.astype(v_blocks.dtype), None, None,
            None if rel is None else d_rel.astype(rel.dtype), None)


def _band_backward(plan: _Plan, q_blocks, k_blocks, v_blocks, key_valid, segments, rel,
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


_blocked_attention.defvjp(_blocked_attention_fwd, _blocked_attention_bwd)


def _dense_local_attention(q, k, v, mask, rel_pos_emb, window_size_left, window_size_right,
                           dropout_rate, dropout_rng, segment_ids, *, block_size, precision,
                           max_segments):
    """``jax.nn.dot_product_attention`` with the same semantics, materialising (n, n) scores."""
    del dropout_rng, block_size, precision, max_segments
    if rel_pos_emb is not None or dropout_rate > 0.0:
        raise ValueError("implementation='dense' supports neither rel_pos_emb nor dropout; "
                         "use implementation='xla'")
    groups = _query_groups(q, k)
    *lead, seq_len, head_dim = k.shape
    # The layout of jax.nn.dot_product_attention, which groups query heads natively: q
    # (batch·kv_heads, n, groups, d) against k, v (batch·kv_heads, n, 1, d).
    q_bthd = jnp.swapaxes(_grouped(q, groups), 1, 2)
    as_bthd = lambda x: x.reshape(-1, seq_len, 1, head_dim)  # noqa: E731

    def heads_first(out):  # (batch·kv_heads, n, groups, d) -> q's shape
        return jnp.swapaxes(out, 1, 2).reshape(q.shape)

    if mask is None and segment_ids is None:
        causal = window_size_right == 0 and window_size_left >= seq_len - 1
        out = jax.nn.dot_product_attention(
            q_bthd, as_bthd(k), as_bthd(v), is_causal=causal,
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
    out = jax.nn.dot_product_attention(q_bthd, as_bthd(k), as_bthd(v), mask=visible)
    # jax averages all values for a query that sees nothing; this module returns zeros.
    return heads_first(jnp.where(visible.any(axis=-1)[:, 0, :, None, None], out, 0))


def _unsupported(implementation: str, mask, rel_pos_emb, dropout_rate, extra=()) -> None:
    """The one-line error of a kernel backend asked for features it does not have."""
    unsupported = [name for name, value in (("mask", mask), ("rel_pos_emb", rel_pos_emb))
                   if value is not None]
    unsupported += ["dropout"] * (dropout_rate > 0.0) + list(extra)
    if unsupported:
        raise ValueError(f"implementation={implementation!r} cannot compute "
                         f"{', '.join(unsupported)}: use implementation='xla' (every feature) "
                         f"or 'auto'")


def _per_row_segments(segment_ids: jax.Array, lead: tuple[int, ...], seq_len: int) -> jax.Array:
    """``segment_ids`` (broadcastable to ``(*lead, n)``, lead = (batch..., heads)) as one
    ``(batch, n)`` int32 row per batch entry: the kernels take ids shared by all heads."""
    heads = lead[-1] if lead else 1
    if heads > 1 and segment_ids.ndim >= 2 and segment_ids.shape[-2] != 1:
        raise ValueError(f"segment_ids has shape {segment_ids.shape}; this implementation "
                         f"takes ids shared by all heads (size 1 on the heads axis)")
    ids = jnp.broadcast_to(segment_ids.astype(jnp.int32), (*lead, seq_len))
    return ids.reshape(-1, heads, seq_len)[:, 0]


def _packed_layout(segment_ids: jax.Array, max_segments: int):
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


def _cudnn_local_attention(q, k, v, mask, rel_pos_emb, window_size_left, window_size_right,
                           dropout_rate, dropout_rng, segment_ids, *, block_size, precision,
                           max_segments):
    """cuDNN's fused flash attention with its sliding-window mask (NVIDIA GPUs). It skips the
    key blocks outside the window, so time and memory stay linear in the sequence length; on
    an H100 it runs about 20× faster than the blocked kernel (see the README). Segment ids go
    to cuDNN's packed layout (each run of equal ids is one sequence), derived here inside the
    jitted computation, with ``max_segments`` slots per row."""
    del dropout_rng, block_size, precision
    extra = [f"window_size_right={window_size_right} (it computes causal windows)"] * bool(
        window_size_right)
    if segment_ids is not None and max_segments is None:
        extra.append("segment_ids without max_segments (its packed layout needs the bound)")
    _unsupported("cudnn", mask, rel_pos_emb, dropout_rate, extra)
    if jax.default_backend() != "gpu":
        raise ValueError(f"implementation='cudnn' needs an NVIDIA GPU; the default backend is "
                         f"{jax.default_backend()!r}: use implementation='xla' or 'auto'")
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"implementation='cudnn' needs bfloat16 or float16 inputs; got {q.dtype}")
    *lead, seq_len, head_dim = k.shape

    def to_bnhd(x):
        """``(..., heads, n, d) -> (batch, n, heads, d)``, the layout of
        jax.nn.dot_product_attention; cuDNN groups query heads over fewer k/v heads natively."""
        heads = x.shape[-3] if x.ndim >= 3 else 1
        return jnp.swapaxes(x.reshape(-1, heads, seq_len, head_dim), 1, 2)

    if segment_ids is None:
        # A window over the whole sequence (a global layer) is plain causal flash attention.
        out = jax.nn.dot_product_attention(
            to_bnhd(q), to_bnhd(k), to_bnhd(v), is_causal=True,
            local_window_size=None if window_size_left >= seq_len - 1 else (window_size_left, 0),
            implementation="cudnn")
    else:
        # The packed layout is only in JAX's cuDNN module (jax.nn does not expose it).
        from jax._src.cudnn import fused_attention_stablehlo as cudnn

        lengths, offsets = _packed_layout(_per_row_segments(segment_ids, tuple(lead), seq_len),
                                          max_segments)
        out = cudnn.dot_product_attention(
            to_bnhd(q), to_bnhd(k), to_bnhd(v), None, None, lengths, lengths, offsets, offsets,
            scale=head_dim ** -0.5, mask_type=cudnn.MaskType.PADDING_CAUSAL, qkv_layout="BTNH",
            sliding_window_length=min(window_size_left, seq_len - 1) + 1)
    return jnp.swapaxes(out, 1, 2).reshape(q.shape)


# Splash attention's padding keys get this segment id, which no real segment may use.
_SPLASH_PADDING_SEGMENT = -(2**31)


@functools.lru_cache(maxsize=32)
def _splash_kernel(padded_len: int, groups: int, left: int, right: int, block: int,
                   interpret: bool):
    """A multi-query splash attention kernel, ``groups`` query heads against one key/value
    head, with a local mask, causal where the window spans the sequence (built once per static
    shape: its mask preprocessing runs in numpy)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    shape = (padded_len, padded_len)
    whole = right == 0 and left >= padded_len - 1
    mask = splash.MultiHeadMask(
        [splash.CausalMask(shape) if whole else splash.LocalMask(shape, (left, right), offset=0)]
        * groups)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                              block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                              block_q_dq=block, block_kv_dq=block)
    return splash.make_splash_mqa(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                  interpret=interpret)


def _splash_local_attention(q, k, v, mask, rel_pos_emb, window_size_left, window_size_right,
                            dropout_rate, dropout_rng, segment_ids, *, block_size, precision,
                            max_segments):
    """The Pallas splash attention kernel of TPUs with a local mask and segment ids: it skips
    the blocks outside the window, in the forward and the backward pass. On other backends
    it runs in Pallas interpret mode (exact, slow: how the tests check it on a CPU)."""
    del dropout_rng, precision, max_segments
    _unsupported("splash", mask, rel_pos_emb, dropout_rate)
    groups = _query_groups(q, k)
    *lead, seq_len, head_dim = k.shape
    kv_heads = lead[-1] if lead else 1
    # Blocks of 512 (multiples of 128, the TPU lane width); the sequence is padded to whole
    # blocks, the padding keys hidden from every real query by their own segment id.
    block = block_size or min(512, _round_up(seq_len, 128))
    padded_len = _round_up(seq_len, block)
    kernel = _splash_kernel(padded_len, groups, min(window_size_left, padded_len),
                            min(window_size_right, padded_len), block,
                            interpret=jax.default_backend() != "tpu")
    if segment_ids is None:
        ids = jnp.zeros((math.prod(lead[:-1]), seq_len), jnp.int32)
    else:
        ids = _per_row_segments(segment_ids, tuple(lead), seq_len)
    # One row per key/value head (the ids are shared by all heads).
    ids = jnp.pad(jnp.repeat(ids, kv_heads, axis=0), [(0, 0), (0, padded_len - seq_len)],
                  constant_values=_SPLASH_PADDING_SEGMENT)

    def padded(x):  # zero-pads the sequence axis (-2)
        return jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, padded_len - seq_len), (0, 0)])

    # The kernel takes one key/value head and its groups of query heads:
    # q (batch·kv_heads, groups, padded n, d), k, v (batch·kv_heads, padded n, d).
    scaled_q = (q * head_dim ** -0.5).astype(q.dtype)
    keys = lambda x: padded(x.reshape(-1, seq_len, head_dim))  # noqa: E731

    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    out = jax.vmap(lambda q, k, v, ids: kernel(q, k, v, segment_ids=SegmentIds(q=ids, kv=ids)))(
        padded(_grouped(scaled_q, groups)), keys(k), keys(v), ids)
    return out[:, :, :seq_len].reshape(q.shape).astype(q.dtype)


# The backends `local_attention(implementation=...)` can dispatch to.
_IMPLEMENTATIONS = {"xla": _xla_local_attention, "dense": _dense_local_attention,
                    "cudnn": _cudnn_local_attention, "splash": _splash_local_attention}
