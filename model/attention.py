"""Exact sliding-window (local) attention: the public entry `local_attention` and its dispatch.

Query ``i`` attends key ``j`` iff ``i - window_size_left <= j <= i + window_size_right``
(the convention of ``jax.nn.dot_product_attention(local_window_size=(left, right))`` and of
FlashAttention's ``window_size``), the key is not masked out, and both lie in the same segment.

This module checks the arguments (`check_arguments`), picks an implementation
(`resolve_implementation`) and calls its kernel in `model.kernels`: ``xla``, the blocked
O(n·w) algorithm (`model.kernels.xla`, whose docstring explains it), ``dense``, ``cudnn`` and
``splash``. Only dispatch lives here.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
from jax import lax

from model.kernels.common import query_groups, target_backend
from model.kernels.cudnn import cudnn_local_attention
from model.kernels.dense import dense_local_attention
from model.kernels.splash import splash_local_attention
from model.kernels.xla import xla_local_attention


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
    scale: float | None = None,
    logit_soft_cap: float | None = None,
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
        ``logit(i, j) = scale · q_i · (k_j + rel_pos_emb[j - i + window_size_left])``.
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
        algorithm of `model.kernels.xla` (any backend, every feature); ``"dense"``,
        ``jax.nn.dot_product_attention`` over the full (n, n) scores (O(n²): a baseline,
        without rel_pos_emb or dropout); ``"cudnn"``, cuDNN's fused sliding-window flash
        attention (NVIDIA GPUs, bfloat16/float16, causal windows; segment_ids need
        ``max_segments``; no mask, rel_pos_emb, dropout or logit_soft_cap); ``"splash"``, the
        Pallas splash attention kernel of TPUs (Pallas interpret mode elsewhere, which is
        slow: for tests; no mask, rel_pos_emb or dropout). An explicit name that cannot run
        the call is a one-line ValueError.
      block_size: query block length (static); by default chosen from the window.
      precision: matmul precision, as for ``jnp.einsum``.
      max_segments: static bound on the segments (documents) in one row of ``segment_ids``,
        for ``cudnn``, whose packed layout needs it. Segments are the contiguous runs of equal
        ids, as packing makes them; a row with more runs is not computed exactly, so the caller
        checks its data (train.py does, batch by batch).
      scale: the logits' factor, a positive finite float (static); None: ``head_dim ** -0.5``.
        Gemma 2 and 3 use ``query_pre_attn_scalar ** -0.5`` (transformers'
        ``modeling_gemma2.py``), which need not be the head size.
      logit_soft_cap: a positive finite float (static), or None (no cap): each logit ``s``
        (``scale · q_i · k_j``, the relative position's part included) becomes
        ``logit_soft_cap · tanh(s / logit_soft_cap)`` before the mask and the softmax, as
        Gemma 2's ``attn_logit_softcapping`` in transformers' ``eager_attention_forward``
        (``modeling_gemma2.py``, 5.24). Every implementation computes it except ``cudnn``
        (an explicit ``"cudnn"`` with a cap is a one-line ValueError; ``auto`` picks another).

    Returns:
      ``(..., seq_len, head_dim)`` in q's dtype. Scores and softmax are computed in float32. A
      query that sees no key (all masked) gets zeros.
    """
    check_arguments(q, k, v, mask, rel_pos_emb, window_size_left, window_size_right,
                    dropout_rate, dropout_rng, segment_ids, block_size=block_size,
                    max_segments=max_segments, scale=scale, logit_soft_cap=logit_soft_cap)
    implementation = resolve_implementation(
        implementation, q.dtype, has_mask=mask is not None,
        has_rel_pos_emb=rel_pos_emb is not None, dropout_rate=dropout_rate,
        window_size_right=window_size_right, has_segment_ids=segment_ids is not None,
        max_segments=max_segments, has_logit_soft_cap=logit_soft_cap is not None)
    return _IMPLEMENTATIONS[implementation](
        q, k, v, mask, rel_pos_emb, int(window_size_left), int(window_size_right),
        dropout_rate, dropout_rng, segment_ids, block_size=block_size, precision=precision,
        max_segments=max_segments, **static_floats(scale=scale, logit_soft_cap=logit_soft_cap))


def static_floats(**values: float | None) -> dict[str, float | None]:
    """``values`` (checked by `check_arguments`) as Python floats, None kept: the kernels take
    them so, since a NumPy or JAX scalar multiplying a bfloat16 q would promote it to float32
    (a Python float keeps q's dtype), and their static tilings hash them."""
    return {name: None if value is None else float(value) for name, value in values.items()}


def resolve_implementation(implementation: str, dtype, *, has_mask: bool = False,
                           has_rel_pos_emb: bool = False, dropout_rate: float = 0.0,
                           window_size_right: int = 0, has_segment_ids: bool = False,
                           max_segments: int | None = None, has_logit_soft_cap: bool = False,
                           backend: str | None = None) -> str:
    """The implementation that `local_attention` runs for a call with these features.

    ``"auto"`` picks the fastest exact path on ``backend`` (default: JAX's default backend, or
    the platform of `model.kernels.common.lowering_platform` where one is in scope):
    on GPUs ``cudnn`` (20× ``xla`` on an H100: docs/benchmarks.md) where the call has a causal
    window, bfloat16/float16 inputs, no mask, relative positions, dropout or logit soft-cap,
    and either no segment ids or a ``max_segments`` bound; on TPUs ``splash`` where the call
    has no mask, relative positions or dropout; otherwise ``xla`` (always on CPUs, where it is
    fastest).
    Other names come back unchanged; an unknown one is a one-line ValueError.
    """
    if implementation not in _IMPLEMENTATIONS and implementation != "auto":
        raise ValueError(
            f"implementation={implementation!r} is not available; expected one of "
            f"{['auto', *sorted(_IMPLEMENTATIONS)]}")
    if implementation != "auto":
        return implementation
    backend = backend or target_backend()
    kernel_features = not (has_mask or has_rel_pos_emb or dropout_rate > 0.0)
    if backend == "gpu" and kernel_features and window_size_right == 0 \
            and not has_logit_soft_cap and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) \
            and (not has_segment_ids or max_segments is not None):
        return "cudnn"
    if backend == "tpu" and kernel_features:
        return "splash"
    return "xla"


def check_arguments(q, k, v, mask, rel_pos_emb, window_size_left, window_size_right,
                    dropout_rate, dropout_rng, segment_ids, *, block_size=None,
                    max_segments=None, scale=None, logit_soft_cap=None) -> None:
    """One-line ValueErrors for shapes and values a caller can get wrong: `local_attention`'s
    arguments, as its docstring gives them (shapes, dtypes, ranges); returns None if they
    are right. ``block_size`` and ``max_segments`` are checked last (positive ints or None),
    then ``scale`` and ``logit_soft_cap`` (positive finite numbers or None)."""
    if q.ndim < 2 or k.shape != v.shape or q.ndim != k.ndim or q.shape[-2:] != k.shape[-2:] \
            or q.shape[:-3] != k.shape[:-3] or query_groups(q, k) is None:
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
    for name, value in (("block_size", block_size), ("max_segments", max_segments)):
        if value is not None and (isinstance(value, bool) or value < 1
                                  or not isinstance(value, numbers.Integral)):
            raise ValueError(f"{name}={value!r}: expected a positive int or None")
    for name, value in (("scale", scale), ("logit_soft_cap", logit_soft_cap)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)
                                  or not math.isfinite(value) or value <= 0):
            raise ValueError(f"{name}={value!r}: expected a positive finite number or None")


def _broadcasts(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    if len(shape) > len(target):
        return False
    return all(s in (1, t) for s, t in zip(shape[::-1], target[::-1]))


# The backends `local_attention(implementation=...)` can dispatch to: each kernel takes
# local_attention's arguments (after `check_arguments`, the windows as ints) and returns its
# result, or raises a one-line ValueError for a feature it does not compute.
_IMPLEMENTATIONS = {"xla": xla_local_attention, "dense": dense_local_attention,
                    "cudnn": cudnn_local_attention, "splash": splash_local_attention}
IMPLEMENTATIONS = ("auto", *_IMPLEMENTATIONS)  # the names `local_attention` takes
