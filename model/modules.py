"""Flax linen modules around `local_attention`: drop-ins for Flax's attention modules.

`MultiHeadLocalAttention` mirrors ``flax.linen.MultiHeadDotProductAttention`` (same attribute
names, same ``query``/``key``/``value``/``out`` parameters) and `LocalSelfAttention` mirrors
``flax.linen.SelfAttention``; both add ``window_size_left``, ``window_size_right`` and
``use_rel_pos_emb``. With ``decode=True`` they keep a rolling cache of the last
``window_size_left + 1`` keys and values, so generation memory does not grow with its length.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.initializers import zeros_init
from jax import lax

from model.attention import local_attention
from model.context_parallel import context_parallel_attention
from model.kernels.common import masked_softmax_parts, soft_cap
from model.rope import NO_SCALING, RopeScaling, apply_rotary

Array = jax.Array
Initializer = Any


class MultiHeadLocalAttention(nn.Module):
    """Multi-head local (sliding-window) attention with input and output projections.

    Query ``i`` attends keys ``i - window_size_left ... i + window_size_right`` (inclusive).

    Attributes:
      num_heads: number of (query) heads; ``qkv_features`` must be divisible by it.
      num_kv_heads: key/value heads (None: ``num_heads``; 1: multi-query attention), dividing
        ``num_heads``: the query heads share them in groups (grouped-query attention), so the
        ``key``/``value`` projections and the decode cache are ``num_heads / num_kv_heads``
        times smaller.
      window_size_left, window_size_right: the window (static ints >= 0). A causal layer uses
        ``window_size_right=0``; decoding requires it.
      use_rel_pos_emb: learn per-head relative position embeddings
        ``rel_pos_emb (num_heads, window_size_left + window_size_right + 1, head_dim)``.
      rotary_base: when set, rotary position embeddings (RoPE, base ``rotary_base``) rotate
        queries and keys by their positions (`model.rope.apply_rotary`).
      rope_scaling: the rotary embeddings' context-extension scaling (`model.rope.RopeScaling`:
        none, linear or YaRN, as `transformers` defines them).
      qk_norm: a norm for queries and keys before RoPE (Gemma 3, Qwen 3, OLMo 3), called
        as ``qk_norm("query_norm")`` and ``qk_norm("key_norm")`` to make the modules applied to
        queries ``(batch..., seq_len, heads, head_dim)`` and keys ``(..., kv_heads,
        head_dim)``; None: no norm.
      dtype: computation dtype (default: inferred from inputs and params).
      param_dtype: parameter dtype.
      qkv_features: total query/key/value width (default: the input width).
      out_features: output width (default: the input width).
      dropout_rate: dropout on the attention weights.
      deterministic: disables dropout; may also be given to ``__call__``. When neither says,
        dropout runs iff a key is available (``prng_key=``, ``dropout_rng=`` or a ``'dropout'``
        rng stream).
      precision, kernel_init, out_kernel_init, bias_init, out_bias_init, use_bias: as in Flax.
      kv_kernel_init, kv_bias_init: initializers of the ``key``/``value`` kernels and
        biases (default ``kernel_init``, ``bias_init``).
      out_use_bias: a bias on the output projection (None: ``use_bias``; Qwen 2 has biases on
        the query, key and value projections only).
      rel_pos_emb_init: initializer of ``rel_pos_emb``.
      decode: autoregressive decoding with ``mutable=['cache']``: a call with several tokens
        prefills a new sequence (its prompt); each call with one token continues it.
      block_size, implementation, max_segments: passed to `local_attention` (``"auto"``: the
        fastest exact kernel for the backend and the call's features).
      attention_scale: the logits' factor (None: ``head_dim ** -0.5``); Gemma's
        ``query_pre_attn_scalar ** -0.5``. Passed to `local_attention` as ``scale``.
      logit_soft_cap: None, or each logit ``s`` becomes ``cap · tanh(s / cap)`` before the
        mask (Gemma 2's ``attn_logit_softcapping``), in the kernels and in decoding. Passed
        to `local_attention`.
    """

    num_heads: int
    num_kv_heads: int | None = None
    window_size_left: int = 128
    window_size_right: int = 128
    use_rel_pos_emb: bool = False
    rotary_base: float | None = None
    rope_scaling: RopeScaling = NO_SCALING
    qk_norm: Callable[[str], nn.Module] | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    qkv_features: int | None = None
    out_features: int | None = None
    dropout_rate: float = 0.0
    deterministic: bool | None = None
    precision: lax.PrecisionLike = None
    kernel_init: Initializer = nn.linear.default_kernel_init
    out_kernel_init: Initializer | None = None
    kv_kernel_init: Initializer | None = None
    kv_bias_init: Initializer | None = None
    bias_init: Initializer = zeros_init()
    out_bias_init: Initializer | None = None
    use_bias: bool = True
    out_use_bias: bool | None = None
    rel_pos_emb_init: Initializer = nn.initializers.normal(stddev=0.02)
    decode: bool = False
    block_size: int | None = None
    implementation: str = "auto"
    max_segments: int | None = None
    attention_scale: float | None = None
    logit_soft_cap: float | None = None

    @nn.compact
    def __call__(
        self,
        inputs_q: Array,
        inputs_k: Array | None = None,
        inputs_v: Array | None = None,
        *,
        mask: Array | None = None,
        segment_ids: Array | None = None,
        positions: Array | None = None,
        deterministic: bool | None = None,
        dropout_rng: Array | None = None,
        prng_key: Array | None = None,
    ) -> Array:
        """Attends ``inputs_q`` to ``inputs_k``/``inputs_v`` (default: self-attention).

        Args:
          inputs_q: ``(batch..., seq_len, features)``.
          inputs_k, inputs_v: the same leading shape and length as ``inputs_q`` (local windows
            align positions); ``inputs_v`` defaults to ``inputs_k``.
          mask: optional key padding mask, bool ``(batch..., seq_len)``; false keys are ignored.
          segment_ids: optional int ``(batch..., seq_len)`` for packed documents.
          positions: int ``(batch..., seq_len)`` positions for rotary embeddings (default:
            ``0 .. seq_len - 1``, or the cache position when decoding); packed documents
            restart them per document.
          deterministic: disables dropout (overrides the attribute).
          dropout_rng, prng_key: the dropout key (``prng_key`` is the name of the original
            ``local_attention_flax``); the same key gives the same output.

        Returns:
          ``(batch..., seq_len, out_features)``.
        """
        if inputs_k is None:
            inputs_k = inputs_q
        if inputs_v is None:
            inputs_v = inputs_k
        features = inputs_q.shape[-1]
        kv_heads, head_dim = self._head_sizes(features)
        dense = functools.partial(
            nn.DenseGeneral, axis=-1, dtype=self.dtype, param_dtype=self.param_dtype,
            bias_init=self.bias_init, use_bias=self.use_bias, precision=self.precision)
        # (batch..., seq_len, heads, head_dim); key and value (..., kv_heads, head_dim)
        query = dense(features=(self.num_heads, head_dim), kernel_init=self.kernel_init,
                      name="query")(inputs_q)
        key_value = functools.partial(dense, features=(kv_heads, head_dim),
                                      kernel_init=self.kv_kernel_init or self.kernel_init,
                                      bias_init=self.kv_bias_init or self.bias_init)
        key = key_value(name="key")(inputs_k)
        value = key_value(name="value")(inputs_v)
        if self.qk_norm is not None:
            query, key = self.qk_norm("query_norm")(query), self.qk_norm("key_norm")(key)
        rel_pos_emb = None
        if self.use_rel_pos_emb:
            width = self.window_size_left + self.window_size_right + 1
            rel_pos_emb = self.param("rel_pos_emb", self.rel_pos_emb_init,
                                     (self.num_heads, width, head_dim), self.param_dtype)
            rel_pos_emb = rel_pos_emb.astype(query.dtype)

        # In decode mode `init` creates the cache; later calls use it.
        cache_ready = self.decode and self.has_variable("cache", "cached_key")
        cache = self._cache(key, value) if self.decode else None
        decode_step = cache_ready and query.shape[-3] == 1  # else a prefill restarts at 0
        if self.rotary_base is not None:
            if positions is None:
                positions = jnp.arange(inputs_q.shape[-2])
                if decode_step:
                    positions = positions + cache["cache_index"].value
            query, key = (apply_rotary(x, positions, self.rotary_base, self.rope_scaling)
                          for x in (query, key))
        if decode_step:
            out = self._decode_step(cache, query, key, value, rel_pos_emb, mask, segment_ids)
        else:
            if cache_ready:
                self._prefill_cache(cache, key, value, mask, segment_ids)
            out = self._attend(query, key, value, rel_pos_emb, mask, segment_ids,
                               *self._dropout(deterministic, dropout_rng, prng_key))

        return nn.DenseGeneral(
            features=self.out_features or features, axis=(-2, -1),
            kernel_init=self.out_kernel_init or self.kernel_init,
            bias_init=self.out_bias_init or self.bias_init,
            use_bias=self.use_bias if self.out_use_bias is None else self.out_use_bias,
            dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
            name="out")(out)

    def _head_sizes(self, features: int) -> tuple[int, int]:
        """``(kv_heads, head_dim)`` for inputs of ``features``; one-line ValueErrors where
        ``num_heads`` does not divide ``qkv_features`` or ``num_kv_heads`` does not divide
        ``num_heads``."""
        qkv_features = self.qkv_features or features
        if qkv_features % self.num_heads:
            raise ValueError(
                f"qkv_features={qkv_features} must be divisible by num_heads={self.num_heads}")
        kv_heads = self.num_kv_heads or self.num_heads
        if self.num_heads % kv_heads:
            raise ValueError(f"num_kv_heads={kv_heads} must divide num_heads={self.num_heads}")
        return kv_heads, qkv_features // self.num_heads

    def _attend(self, query, key, value, rel_pos_emb, mask, segment_ids, dropout_rate,
                dropout_rng) -> Array:
        """A whole sequence (or a prompt): ``query (batch..., seq_len, heads, head_dim)``,
        ``key``/``value`` ``(batch..., seq_len, kv_heads, head_dim)``, ``mask`` and
        ``segment_ids`` ``(batch..., seq_len)`` or None -> ``(batch..., seq_len, heads,
        head_dim)`` in query's dtype, by `context_parallel_attention`."""
        heads_first = functools.partial(jnp.swapaxes, axis1=-3, axis2=-2)
        add_head_axis = lambda x: None if x is None else x[..., None, :]  # noqa: E731
        # The sequence may be sharded over a context mesh axis; a prompt never is.
        attend = local_attention if self.decode else context_parallel_attention
        return heads_first(attend(
            heads_first(query), heads_first(key), heads_first(value),
            mask=add_head_axis(mask), rel_pos_emb=rel_pos_emb,
            window_size_left=self.window_size_left, window_size_right=self.window_size_right,
            dropout_rate=dropout_rate, dropout_rng=dropout_rng,
            segment_ids=add_head_axis(segment_ids), implementation=self.implementation,
            block_size=self.block_size, precision=self.precision,
            max_segments=self.max_segments, scale=self.attention_scale,
            logit_soft_cap=self.logit_soft_cap))

    def _dropout(self, deterministic, dropout_rng, prng_key) -> tuple[float, Array | None]:
        """The dropout rate and key to use for this call (rate 0 when deterministic)."""
        if self.dropout_rate == 0.0:
            return 0.0, None
        key = prng_key if prng_key is not None else dropout_rng
        if deterministic is None:
            deterministic = self.deterministic
        if deterministic is None:
            deterministic = key is None and not self.has_rng("dropout")
        if deterministic:
            return 0.0, None
        return self.dropout_rate, key if key is not None else self.make_rng("dropout")

    def _cache(self, key: Array, value: Array) -> dict[str, nn.Variable]:
        """The rolling cache, created at ``init``: the last ``window_size_left + 1`` keys and
        values ``(batch..., slots, kv_heads, head_dim)``, which slots hold a (non-masked) token
        ``(batch..., slots)``, and the next position."""
        if self.window_size_right != 0:
            raise ValueError(
                f"decode=True needs a causal layer (window_size_right=0); got "
                f"window_size_right={self.window_size_right}")
        *batch, _, heads, head_dim = key.shape
        slots = self.window_size_left + 1
        shape = (*batch, slots, heads, head_dim)
        return {
            "cached_key": self.variable("cache", "cached_key", jnp.zeros, shape, key.dtype),
            "cached_value": self.variable("cache", "cached_value", jnp.zeros, shape, value.dtype),
            "cached_mask": self.variable("cache", "cached_mask", jnp.zeros, (*batch, slots), bool),
            # Each slot's segment (packed documents): a token attends only its own.
            "cached_segment": self.variable("cache", "cached_segment", jnp.zeros,
                                            (*batch, slots), jnp.int32),
            "cache_index": self.variable("cache", "cache_index",
                                         lambda: jnp.array(0, jnp.int32)),
        }

    def _prefill_cache(self, cache, key: Array, value: Array, mask: Array | None,
                       segment_ids: Array | None) -> None:
        """Writes a prompt's last ``window_size_left + 1`` keys and values (and their key mask
        and segment ids) into an empty cache.

        ``key``/``value``: ``(batch..., prompt_len, heads, head_dim)``. A prefill starts a new
        sequence: whatever the cache held is replaced and the next position is ``prompt_len``.
        """
        *batch, slots, _, _ = cache["cached_key"].value.shape
        length = key.shape[-3]
        if tuple(key.shape[:-3]) != tuple(batch):
            raise ValueError(f"prefill batch shape {key.shape[:-3]} does not match the cache's "
                             f"{tuple(batch)}")
        kept = min(length, slots)
        # Position p lives in slot p % slots, as in `_decode_step`.
        slot_of_kept = np.arange(length - kept, length) % slots
        token_mask = jnp.ones((*batch, length), bool) if mask is None else mask.astype(bool)
        segments = (jnp.zeros((*batch, length), jnp.int32) if segment_ids is None
                    else jnp.broadcast_to(segment_ids, (*batch, length)))
        axis = len(batch)
        for name, new in (("cached_key", key), ("cached_value", value),
                          ("cached_mask", token_mask), ("cached_segment", segments)):
            kept_rows = lax.slice_in_dim(new, length - kept, length, axis=axis)
            empty = jnp.zeros_like(cache[name].value)
            cache[name].value = empty.at[(slice(None),) * axis + (slot_of_kept,)].set(
                kept_rows.astype(empty.dtype))
        cache["cache_index"].value = jnp.array(length, jnp.int32)

    def _decode_step(self, cache, query, key, value, rel_pos_emb, mask, segment_ids) -> Array:
        """One token: ``query (batch..., 1, heads, head_dim)``, ``key/value (batch..., 1,
        kv_heads, head_dim)`` -> ``(batch..., 1, heads, head_dim)``.

        The token at position ``t`` is written to slot ``t % (window_size_left + 1)``, where it
        overwrites the key that has just left the window. It attends only cached keys of its
        segment (``segment_ids (batch..., 1)``; None: the previous token's segment).
        """
        cached_key, cached_value = cache["cached_key"], cache["cached_value"]
        cached_mask, cache_index = cache["cached_mask"], cache["cache_index"]
        *batch, slots, kv_heads, head_dim = cached_key.value.shape
        heads = query.shape[-2]
        if query.shape != (*batch, 1, heads, head_dim):
            raise ValueError(
                f"decode=True continues a sequence one token at a time: expected inputs of "
                f"shape {tuple(batch) + (1,)} + (features,), got {query.shape[:-2]} + (features,)")
        position = cache_index.value
        slot = position % slots
        token_mask = jnp.ones((*batch, 1), bool) if mask is None else mask.astype(bool)

        def write(cache, new):
            start = (0,) * len(batch) + (slot,) + (0,) * (cache.ndim - len(batch) - 1)
            return lax.dynamic_update_slice(cache, new.astype(cache.dtype), start)

        cached_key.value = write(cached_key.value, key)
        cached_value.value = write(cached_value.value, value)
        cached_segment = cache["cached_segment"]
        if segment_ids is None:  # the sequence goes on in the previous token's segment
            previous = (position - 1) % slots
            segment = lax.dynamic_slice_in_dim(cached_segment.value, previous, 1, len(batch))
        else:
            segment = jnp.broadcast_to(segment_ids, (*batch, 1)).astype(jnp.int32)
        cached_mask.value = write(cached_mask.value, token_mask.reshape(*batch, 1))
        cached_segment.value = write(cached_segment.value, segment)
        cache_index.value = position + 1

        # Slot s holds position `position - age`, age = (position - s) mod slots; slots not yet
        # written are still masked out.
        age = (position - jnp.arange(slots)) % slots
        visible = (cached_mask.value & (cached_segment.value == segment))[..., None, :]
        # Query heads grouped by their key/value head: (batch..., kv_heads, groups, head_dim).
        q = query[..., 0, :, :].reshape(*batch, kv_heads, heads // kv_heads, head_dim)
        # A Python float keeps a bfloat16 q's dtype, as in the kernels.
        q = q * (head_dim ** -0.5 if self.attention_scale is None else float(self.attention_scale))
        scores = jnp.einsum("...kgd,...skd->...kgs", q, cached_key.value,
                            precision=self.precision, preferred_element_type=jnp.float32)
        if rel_pos_emb is not None:
            # Key position - query position + window_size_left = window_size_left - age.
            rel = rel_pos_emb[:, self.window_size_left - age]  # (heads, slots, head_dim)
            rel = rel.reshape(kv_heads, heads // kv_heads, slots, head_dim)
            scores = scores + jnp.einsum("...kgd,kgsd->...kgs", q, rel, precision=self.precision,
                                         preferred_element_type=jnp.float32)
        scores = soft_cap(scores, self.logit_soft_cap)
        (exps,), total, _ = masked_softmax_parts([scores], [visible[..., None, :, :]])
        out = jnp.einsum("...kgs,...skd->...kgd", exps.astype(value.dtype), cached_value.value,
                         precision=self.precision, preferred_element_type=jnp.float32)
        out = out / jnp.where(total > 0, total, 1.0)[..., None]
        return out.reshape(*batch, 1, heads, head_dim).astype(query.dtype)


class LocalSelfAttention(MultiHeadLocalAttention):
    """Self-attention version of `MultiHeadLocalAttention` (as Flax's ``SelfAttention``)."""

    @nn.compact
    def __call__(  # type: ignore[override]
        self,
        inputs_q: Array,
        mask: Array | None = None,
        *,
        segment_ids: Array | None = None,
        positions: Array | None = None,
        deterministic: bool | None = None,
        dropout_rng: Array | None = None,
        prng_key: Array | None = None,
    ) -> Array:
        """``inputs_q (batch..., seq_len, features) -> (batch..., seq_len, out_features)``."""
        return super().__call__(inputs_q, mask=mask, segment_ids=segment_ids, positions=positions,
                                deterministic=deterministic, dropout_rng=dropout_rng,
                                prng_key=prng_key)
