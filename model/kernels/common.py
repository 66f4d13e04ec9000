"""What several kernels share: head grouping, padding, the masked softmax, the logit soft-cap
and their errors.

`masked_softmax_parts` and `soft_cap` also serve decoding (`model.modules`), which attends one
query to its cache outside the kernels.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp

from errors import UserError

# The platform being lowered for, where it is not JAX's default backend (`lowering_platform`).
_LOWERING_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "lowering_platform", default=None)
_BACKEND_OF_PLATFORM = {"cuda": "gpu", "rocm": "gpu", "gpu": "gpu", "tpu": "tpu", "cpu": "cpu"}


@contextlib.contextmanager
def lowering_platform(platform: str) -> Iterator[None]:
    """Within it, traced attention chooses its kernel for ``platform`` ("cpu", "cuda",
    "rocm" or "tpu", as ``jax.export``'s ``platforms`` names them) instead of JAX's default
    backend: ``auto``'s pick and splash's interpret mode. For lowering on one machine what
    another runs: ``with lowering_platform("tpu"): jax.export.export(f, platforms=["tpu"])``.
    Raises `UserError` for another name."""
    if platform not in _BACKEND_OF_PLATFORM:
        raise UserError(f"platform={platform!r}: expected one of {sorted(_BACKEND_OF_PLATFORM)}")
    token = _LOWERING_PLATFORM.set(platform)
    try:
        yield
    finally:
        _LOWERING_PLATFORM.reset(token)


def target_backend() -> str:
    """"cpu", "gpu" or "tpu": what the traced computation will run on (`lowering_platform`,
    else JAX's default backend)."""
    platform = _LOWERING_PLATFORM.get()
    return _BACKEND_OF_PLATFORM[platform] if platform else jax.default_backend()


def round_up(x: int, multiple: int) -> int:
    """The least multiple of ``multiple`` that is at least ``x`` (Python ints)."""
    return -(-x // multiple) * multiple


def query_groups(q: jax.Array, k: jax.Array) -> int | None:
    """Query heads per key/value head (axis -3; 1 without a heads axis), None if they do not
    divide."""
    if q.ndim < 3:
        return 1
    heads, kv_heads = q.shape[-3], k.shape[-3]
    return heads // kv_heads if kv_heads and heads % kv_heads == 0 else None


def grouped(x: jax.Array, groups: int) -> jax.Array:
    """``(..., heads, *rest) -> (prod(...) * kv_heads, groups, *rest)``, query heads next to
    the others of their key/value head (a reshape: no copy)."""
    if x.ndim < 3:
        return x[None, None]
    return x.reshape(-1, groups, *x.shape[-2:])


# The segment id of keys that no query may attend (splash's padding, context parallelism's
# halos beyond the ends of the sequence): no real segment may use it.
NO_SEGMENT = -(2**31)


def pad_sequence(x: jax.Array, before: int, after: int, axis: int = 1,
                 value: int | float = 0) -> jax.Array:
    """Pads the sequence axis ``axis`` of ``x`` with ``before`` and ``after`` positions of
    ``value`` (x's dtype and other axes kept): by default axis 1, the sequence axis of a
    flattened ``(batch, seq, ...)`` array; -2 for a ``(..., seq, head_dim)`` one."""
    widths = [(0, 0)] * x.ndim
    widths[axis] = (before, after)
    return jnp.pad(x, widths, constant_values=value)


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


def soft_cap(scores: jax.Array, cap: float | None) -> jax.Array:
    """Attention logit soft-capping, ``cap · tanh(scores / cap)``, as transformers' Gemma 2
    (``attn_logit_softcapping``, `eager_attention_forward` in ``modeling_gemma2.py``) applies
    it to the scaled scores before the mask; ``scores`` unchanged (no operation) for
    ``cap=None``. Any shape; float32 scores in the kernels."""
    if cap is None:
        return scores
    return jnp.tanh(scores / cap) * cap


def soft_cap_backward(capped: jax.Array, d_capped: jax.Array, cap: float | None) -> jax.Array:
    """The gradient of the scores from that of `soft_cap`'s result ``capped``:
    ``d/ds cap·tanh(s/cap) = 1 - tanh²(s/cap) = 1 - (capped / cap)²``, so the uncapped
    scores need not be kept; ``d_capped`` unchanged for ``cap=None``."""
    if cap is None:
        return d_capped
    return d_capped * (1.0 - jnp.square(capped / cap))


def reject_unsupported(implementation: str, mask, rel_pos_emb, dropout_rate, extra=()) -> None:
    """The one-line error of a kernel backend asked for features it does not have: raises a
    `UserError` naming each of ``mask``, ``rel_pos_emb`` (not None), dropout (a positive
    ``dropout_rate``) and the ``extra`` descriptions, if there is any; else returns None."""
    unsupported = [name for name, value in (("mask", mask), ("rel_pos_emb", rel_pos_emb))
                   if value is not None]
    unsupported += ["dropout"] * (dropout_rate > 0.0) + list(extra)
    if unsupported:
        raise UserError(f"implementation={implementation!r} cannot compute "
                        f"{', '.join(unsupported)}: use implementation='xla' (every feature) "
                        f"or 'auto'")


def per_row_segments(segment_ids: jax.Array, lead: tuple[int, ...], seq_len: int) -> jax.Array:
    """``segment_ids`` (broadcastable to ``(*lead, n)``, lead = (batch..., heads)) as one
    ``(batch, n)`` int32 row per batch entry: the kernels take ids shared by all heads (a
    ValueError for ids that differ per head)."""
    heads = lead[-1] if lead else 1
    if heads > 1 and segment_ids.ndim >= 2 and segment_ids.shape[-2] != 1:
        raise ValueError(f"segment_ids has shape {segment_ids.shape}; this implementation "
                         f"takes ids shared by all heads (size 1 on the heads axis)")
    ids = jnp.broadcast_to(segment_ids.astype(jnp.int32), (*lead, seq_len))
    return ids.reshape(-1, heads, seq_len)[:, 0]
