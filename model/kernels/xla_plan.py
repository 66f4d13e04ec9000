"""The static tiling of the blocked ``"xla"`` kernel (`model.kernels.xla`): block and chunk
sizes, and which of its two schedules a call runs (`Plan.loop_over_key_blocks`: the band
schedule of `model.kernels.xla_band` or the looped one of `model.kernels.xla_looped`), and the
mask of the scores both schedules compute (`score_mask`).
"""

from __future__ import annotations

from typing import NamedTuple

from jax import lax

from model.kernels.common import round_up


# Scores per chunk (batch·heads × chunk queries × visible key blocks) that the automatic
# chunk size aims for: 2**21 float32 = 8 MiB, which measured fastest on CPU (bench/attention.py)
# and keeps the working set negligible on accelerators.
_CHUNK_SCORES = 2**21


class Plan(NamedTuple):
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
    logit_soft_cap: float | None  # `model.kernels.common.soft_cap`'s cap; None: no cap

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
            return round_up(self.seq_len, self.block)
        return self.block * (self.num_blocks + self.views - 1)


def _views(block: int, left: int, right: int) -> int:
    """Key blocks a query block can see."""
    return -(-(block + left + right) // block)


def _default_block(window: int) -> int:
    """Half the window, as a power of two in [16, 128]: measured fastest on CPU for w = 257.

    Larger blocks run faster matmuls but compute more masked-out scores
    (a fraction ``block / (block + window)``)."""
    return 1 << max(4, min(7, (window // 2).bit_length() - 1))


def make_plan(
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
    logit_soft_cap: float | None = None,
) -> Plan:
    """The tiling of a call over ``batch`` rows (batch · query heads) of ``seq_len`` keys and
    ``query_len`` queries (default ``seq_len``) at ``query_offset`` into them, with the window,
    ``block_size`` (None: chosen from the window, or from the batch for the looped schedule)
    and the other static arguments of `model.local_attention` (checked there).

    Raises a one-line ValueError for queries at an offset with relative positions."""
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
        block = min(block_size or _default_loop_block(batch), round_up(query_len, 8))
        num_blocks = -(-query_len // block)
        blocks_per_chunk, num_chunks = 1, num_blocks
    else:
        block = min(block_size or _default_block(left + right + 1), round_up(seq_len, 8))
        num_blocks = -(-seq_len // block)
        visible_keys = block * _views(block, left, right)
        blocks_per_chunk = max(1, min(num_blocks,
                                      _CHUNK_SCORES // (batch * block * visible_keys)))
        num_chunks = -(-num_blocks // blocks_per_chunk)
        # Spread the blocks evenly over the chunks so that padding stays under one chunk.
        blocks_per_chunk = -(-num_blocks // num_chunks)
    return Plan(
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
        logit_soft_cap=logit_soft_cap,
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


def score_mask(plan: Plan, key_minus_query, key_valid, query_segments, key_segments):
    """Which scores count, bool ``(..., block, block)``: the key lies in the query's window
    (``key_minus_query``, int ``(block, block)``), is valid (``key_valid``, bool
    ``(..., block)``) and in the query's segment (int ``(..., block)`` each, or None)."""
    vis = ((key_minus_query >= -plan.left) & (key_minus_query <= plan.right)
           & key_valid[..., None, :])
    if query_segments is not None:
        vis = vis & (query_segments[..., :, None] == key_segments[..., None, :])
    return vis
