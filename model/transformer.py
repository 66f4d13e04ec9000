"""The causal language model: token embedding, pre-norm blocks of local attention and MLP.

Every attention layer is a causal `MultiHeadLocalAttention` (``window_size_left =
window_size``, ``window_size_right = 0``), so a layer's cost is linear in the context and the
model's receptive field is ``num_layers * window_size`` tokens, except the ``global_layers``,
whose window is the whole sequence (Gemma's mix of local and global layers). Parameters carry
logical axis names (``vocab``, ``embed``, ``heads``, ``kv_heads``, ``kv``, ``mlp``, ``layers``)
that the training code maps to mesh axes by rules in the config (MaxText's scheme).

The hyperparameters are `model.config.TransformerConfig`; the scanned, rematerialised layers
(``scan_layers`` with ``remat``) run `model.layer_stack`; parameter and FLOP counts are in
`model.flops`.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from model.config import TransformerConfig
from model.context_parallel import sequence_shards
from model.kernels.common import soft_cap
from model.layer_stack import global_layer_mask, layer_stack
from model.modules import MultiHeadLocalAttention


class _LogicallyPartitioned(nn.LogicallyPartitioned):
    """`nn.LogicallyPartitioned` that leaves out the sharding constraint on a value whose rank
    is not that of its names. Flax's DenseGeneral initialises its kernel flat and reshapes
    it afterwards, and it re-runs the initializer (abstractly) in every ``apply`` to check
    shapes: with logical axis rules active, the constraint on the flat kernel would fail."""

    def unbox(self, apply_constraint=True):
        return super().unbox(apply_constraint and jnp.ndim(self.value) == len(self.names))


def _init(initializer, *axes: str | None):
    """An initializer whose parameter carries logical axis names."""
    return lambda *args, **kwargs: _LogicallyPartitioned(initializer(*args, **kwargs), axes)


_DENSE_INIT = nn.initializers.xavier_uniform()
# Embeddings of variance 1/d_model, scaled up by sqrt(d_model) on input (Gemma's scheme): inputs
# of unit scale, and tied output logits of unit scale at initialisation.
_EMBED_INIT = nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=1, out_axis=0)


class PlusOneRMSNorm(nn.Module):
    """Gemma's RMSNorm: ``x / sqrt(mean(x²) + epsilon) · (1 + scale)`` in float32, cast to
    ``dtype``, with ``scale`` (initialised to 0) over the trailing ``feature_axes``, which are
    also the axes reduced (transformers' ``Gemma2RMSNorm``, whose weights load unchanged)."""

    epsilon: float
    dtype: jnp.dtype
    feature_axes: tuple[int, ...] = (-1,)
    scale_init: nn.initializers.Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = tuple(x.shape[axis] for axis in self.feature_axes)
        scale = self.param("scale", self.scale_init, shape, jnp.float32)
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=self.feature_axes, keepdims=True)
                              + self.epsilon)
        return (x * (1.0 + scale)).astype(self.dtype)


def _norm(config: TransformerConfig, name: str, feature_axes: tuple[int, ...] = (-1,),
          axis_names: tuple[str, ...] = ("embed",)) -> nn.Module:
    """A norm of ``config.norm``'s kind named ``name`` over ``feature_axes`` (whose
    parameters carry the logical ``axis_names``)."""
    if config.norm == "rmsnorm_plus_one":
        return PlusOneRMSNorm(config.norm_eps, config.compute_dtype, feature_axes,
                              _init(nn.initializers.zeros, *axis_names), name=name)
    scale_init = _init(nn.initializers.ones, *axis_names)
    axes = {} if feature_axes == (-1,) else {"reduction_axes": feature_axes,
                                             "feature_axes": feature_axes}
    if config.norm == "rmsnorm":
        return nn.RMSNorm(epsilon=config.norm_eps, dtype=config.compute_dtype,
                          scale_init=scale_init, name=name, **axes)
    return nn.LayerNorm(epsilon=config.norm_eps, dtype=config.compute_dtype, scale_init=scale_init,
                        bias_init=_init(nn.initializers.zeros, *axis_names), name=name, **axes)


class Mlp(nn.Module):
    """``(batch, seq_len, d_model) -> (batch, seq_len, d_model)``: SwiGLU, GeGLU or GELU
    (``config.activation``; GELU in its tanh approximation, as Gemma's)."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        config = self.config
        shape = x.shape
        if sequence_shards() == 1:
            # On rows of tokens: XLA:CPU fuses (batch, length, ·) elementwise gating with
            # (rows, ·) views of the matmuls' outputs, and those fusions ran 3× slower than
            # plain ones (16% of a small model's step, bench/step.py). Where the sequence is
            # split over devices, merging it with the batch would gather it.
            x = x.reshape(-1, shape[-1])
        dense = functools.partial(nn.Dense, dtype=config.compute_dtype, use_bias=False)
        up = lambda name: dense(config.mlp_dim, kernel_init=_init(_DENSE_INIT, "embed", "mlp"),  # noqa: E731
                                name=name)(x)
        if config.activation == "swiglu":
            hidden = nn.silu(up("gate")) * up("up")
        elif config.activation == "geglu":
            hidden = nn.gelu(up("gate"), approximate=True) * up("up")
        else:
            hidden = nn.gelu(up("up"))
        hidden = nn.Dropout(config.dropout_rate)(hidden, deterministic=deterministic)
        return dense(config.d_model, kernel_init=_init(_DENSE_INIT, "mlp", "embed"),
                     name="down")(hidden).reshape(shape)


class DecoderBlock(nn.Module):
    """Residual block: ``x + attention(norm(x))``, then ``x + mlp(norm(x))`` (pre-norm; with
    ``config.block_norms`` also or only a norm on each sublayer's output).

    ``global_layer`` (static) makes the attention window the whole sequence: ``seq_len - 1``
    keys back, or when decoding ``decode_length - 1`` (its cache holds every position). The
    parameters are the same as a local layer's.
    """

    config: TransformerConfig
    decode: bool = False
    decode_length: int = 0  # the longest sequence a decode cache serves (global layers)

    @nn.compact
    def __call__(self, x, segment_ids, positions, deterministic: bool, global_layer: bool = False):
        config = self.config
        head_dim = config.resolved_head_dim
        window = config.window_size
        if global_layer and self.decode:
            if self.decode_length < 1:
                raise ValueError("decoding a model with global layers needs decode_length: the "
                                 "longest sequence (prompt + new tokens) its caches hold")
            window = self.decode_length - 1
        elif global_layer:
            window = max(x.shape[-2] - 1, 0)
        rope_base, rope_scaling = config.rope(global_layer)
        kv_heads_name = "kv_heads" if config.resolved_num_kv_heads < config.num_heads else "heads"

        def qk_norm(name: str) -> nn.Module:
            """``query_norm`` on queries ``(..., heads, head_dim)``, ``key_norm`` on keys
            ``(..., kv_heads, head_dim)``: over each head's features or all heads'."""
            if config.qk_norm == "head":
                return _norm(config, name, (-1,), ("kv",))
            heads = "heads" if name == "query_norm" else kv_heads_name
            return _norm(config, name, (-2, -1), (heads, "kv"))

        attention = MultiHeadLocalAttention(
            num_heads=config.num_heads,
            num_kv_heads=config.resolved_num_kv_heads,
            qkv_features=config.num_heads * head_dim,
            window_size_left=window,
            window_size_right=0,
            use_rel_pos_emb=config.position_embedding == "relative",
            rotary_base=rope_base if config.position_embedding == "rope" else None,
            rope_scaling=rope_scaling,
            dtype=config.compute_dtype,
            dropout_rate=config.attention_dropout_rate,
            deterministic=deterministic,
            use_bias=config.qkv_bias,
            out_use_bias=False,
            bias_init=_init(nn.initializers.zeros, "heads", "kv"),
            kv_bias_init=_init(nn.initializers.zeros, kv_heads_name, "kv"),
            qk_norm=None if config.qk_norm == "none" else qk_norm,
            attention_scale=config.attention_scale,
            logit_soft_cap=config.attention_logit_soft_cap,
            kernel_init=_init(_DENSE_INIT, "embed", "heads", "kv"),
            kv_kernel_init=_init(_DENSE_INIT, "embed", kv_heads_name, "kv"),
            out_kernel_init=_init(_DENSE_INIT, "heads", "kv", "embed"),
            rel_pos_emb_init=_init(nn.initializers.normal(stddev=0.02), "heads", None, "kv"),
            decode=self.decode,
            implementation=config.attention_implementation,
            max_segments=config.max_documents_per_row,
            name="attention")

        def residual(x, sublayer, norm_name: str, post_norm_name: str):
            """``x + sublayer(x)`` with the norms ``config.block_norms`` places."""
            hidden = sublayer(x if config.block_norms == "post" else _norm(config, norm_name)(x))
            if config.block_norms != "pre":
                hidden = _norm(config, post_norm_name)(hidden)
            return x + nn.Dropout(config.dropout_rate)(hidden, deterministic=deterministic)

        x = residual(x, lambda x: attention(x, segment_ids=segment_ids, positions=positions),
                     "attention_norm", "post_attention_norm")
        x = residual(x, lambda x: Mlp(config, name="mlp")(x, deterministic), "mlp_norm",
                     "post_mlp_norm")
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))


def _num_chunks(length: int, chunk_size: int) -> int:
    """Chunks of at most ``chunk_size`` tokens (0: one chunk) covering ``length`` tokens."""
    return max(1, -(-length // chunk_size)) if chunk_size else 1


def to_sequence_chunks(x: jax.Array, num_chunks: int) -> jax.Array:
    """``(batch, seq_len, ...) -> (num_chunks, batch, ceil(seq_len / num_chunks), ...)``.

    Chunk ``c`` holds positions ``c, c + num_chunks, c + 2 num_chunks, ...`` (zero-padded at the
    end): strided rather than contiguous, so that where the sequence is sharded over devices
    every device holds its own share of every chunk and a scan over chunks stays local.
    """
    batch, length, *rest = x.shape
    chunk = -(-length // num_chunks)
    if chunk * num_chunks != length:
        x = jnp.pad(x, [(0, 0), (0, chunk * num_chunks - length)] + [(0, 0)] * len(rest))
    return jnp.moveaxis(x.reshape(batch, chunk, num_chunks, *rest), 2, 0)


def from_sequence_chunks(chunks: jax.Array, length: int) -> jax.Array:
    """The inverse of `to_sequence_chunks`: ``(num_chunks, batch, chunk, ...) -> (batch, length, ...)``."""
    num_chunks, batch, chunk, *rest = chunks.shape
    x = jnp.moveaxis(chunks, 0, 2).reshape(batch, chunk * num_chunks, *rest)
    return x[:, :length]


class _ScannedBlock(DecoderBlock):
    """`DecoderBlock` with the ``(carry, is_global) -> (carry, None)`` signature of
    ``nn.scan``: ``is_global`` (scanned, a bool per layer) picks the global or the local window
    by ``nn.cond`` where the model has both (their parameters are alike, so one stack holds
    them)."""

    @nn.compact
    def __call__(self, x, segment_ids, positions, deterministic: bool,  # type: ignore[override]
                 is_global=False):
        def block(module, global_layer):
            return DecoderBlock.__call__(module, x, segment_ids, positions, deterministic,
                                         global_layer)

        if not self.config.global_layer_indices:
            return block(self, False), None
        return nn.cond(is_global, functools.partial(block, global_layer=True),
                       functools.partial(block, global_layer=False), self), None


class _OutputKernel(nn.Module):
    """The untied output projection's ``(d_model, vocab_size)`` kernel (``logits/kernel``, the
    parameter of the ``nn.Dense`` it replaces), so that logits can be computed in chunks."""

    config: TransformerConfig

    @nn.compact
    def __call__(self) -> jax.Array:
        return self.param("kernel", _init(_DENSE_INIT, "embed", "vocab"),
                          (self.config.d_model, self.config.vocab_size), jnp.float32)


def _logits(x: jax.Array, kernel: jax.Array, cap: float | None = None) -> jax.Array:
    """``x (batch, length, d_model) @ kernel (d_model, vocab)`` in x's dtype -> float32,
    soft-capped at ``cap`` (None: not capped)."""
    logits = jnp.dot(x, kernel.astype(x.dtype))
    logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab")).astype(jnp.float32)
    return soft_cap(logits, cap)


def chunked_token_losses(x: jax.Array, kernel: jax.Array, targets: jax.Array,
                         chunk_size: int, cap: float | None = None) -> jax.Array:
    """Cross-entropy of each target without the whole logits: ``(batch, seq_len)`` float32.

    ``x (batch, seq_len, d_model)``: the final hidden states; ``kernel (d_model, vocab)``: the
    output projection; ``targets (batch, seq_len)`` int; ``cap``: the logits' soft cap
    (`model.kernels.common.soft_cap`, Gemma 2's formula; None: none). The logits are computed
    ``chunk_size`` tokens at a time (0: about 2**24 logits per chunk) and recomputed in the
    backward pass, so at most one chunk's float32 ``(chunk, vocab)`` logits exist at once.
    """
    chunk_size = chunk_size or max(1, 2**24 // kernel.shape[-1])
    num_chunks = _num_chunks(x.shape[1], chunk_size)

    @jax.checkpoint
    def chunk_losses(chunk):
        x_chunk, targets_chunk = chunk
        return optax.softmax_cross_entropy_with_integer_labels(
            _logits(x_chunk, kernel, cap), targets_chunk)

    losses = jax.lax.map(chunk_losses, (to_sequence_chunks(x, num_chunks),
                                        to_sequence_chunks(targets, num_chunks)))
    return from_sequence_chunks(losses, x.shape[1])


class TransformerLM(nn.Module):
    """Decoder-only causal language model of local-attention blocks.

    ``__call__(tokens (batch, seq_len) int, segment_ids=None, positions=None,
    deterministic=True, targets=None) -> logits (batch, seq_len, vocab_size) float32``; given
    ``targets (batch, seq_len)`` int, it returns their cross-entropy ``(batch, seq_len)``
    float32 instead, computed in chunks (`chunked_token_losses`) so that the whole logits
    never exist: what training and evaluation use.

    ``segment_ids`` and ``positions`` (both ``(batch, seq_len)`` int) describe packed documents:
    attention never crosses a segment boundary and positions restart per document. With
    ``decode=True`` the attention layers keep rolling caches (``mutable=['cache']``): the first
    call after ``init`` may hold a whole prompt, each later call one token; global layers
    keep every position of a sequence of up to ``decode_length`` tokens, local layers the last
    ``window_size + 1`` (a model with global layers and ``scan_layers`` decodes with its layers
    unstacked, `model.layer_stack.unstack_layers`, as `model.sampling.generate` does).
    """

    config: TransformerConfig
    decode: bool = False
    decode_length: int = 0  # decoding with global layers: the longest sequence (prompt + new)

    @nn.compact
    def __call__(self, tokens, segment_ids=None, positions=None, deterministic: bool = True,
                 targets=None):
        config = self.config
        embed = nn.Embed(config.vocab_size, config.d_model, dtype=config.compute_dtype,
                         embedding_init=_init(_EMBED_INIT, "vocab", "embed"), name="embed")
        x = embed(tokens)
        if config.scale_embeddings:
            x = x * jnp.sqrt(config.d_model).astype(config.compute_dtype)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        x = nn.Dropout(config.dropout_rate)(x, deterministic=deterministic)

        # deterministic is a Python bool: static for remat and broadcast by scan.
        global_layers = config.global_layer_indices
        if config.scan_layers and self.decode and global_layers:
            raise ValueError("decoding with model.global_layers and model.scan_layers needs the "
                             "layers unstacked (model.layer_stack.unstack_layers, as generate "
                             "does): global and local layers hold caches of different sizes")
        if config.scan_layers and config.remat and not self.decode and not self.is_initializing():
            dropout = not deterministic and (config.dropout_rate or config.attention_dropout_rate)
            x = layer_stack(DecoderBlock, config, deterministic,
                            nn.unbox(self.variables["params"]["layers"]), x, segment_ids,
                            positions, self.make_rng("dropout") if dropout else None)
        elif config.scan_layers:
            block = _ScannedBlock
            if config.remat:  # only to create the parameters (init) or caches (decode)
                block = nn.remat(block, prevent_cse=False, static_argnums=(4,))
            x, _ = nn.scan(
                block, variable_axes={"params": 0, "cache": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0),
                length=config.num_layers, metadata_params={nn.PARTITION_NAME: "layers"},
            )(config, decode=self.decode, name="layers")(
                x, segment_ids, positions, deterministic, global_layer_mask(config))
        else:
            block = DecoderBlock
            if config.remat:
                block = nn.remat(DecoderBlock, static_argnums=(4, 5))
            for layer in range(config.num_layers):
                x = block(config, decode=self.decode, decode_length=self.decode_length,
                          name=f"layer_{layer}")(x, segment_ids, positions, deterministic,
                                                 layer in global_layers)

        x = _norm(config, "final_norm")(x)
        if config.tie_embeddings:
            kernel = embed.embedding.T  # (d_model, vocab_size)
        else:
            kernel = _OutputKernel(config, name="logits")()
        if targets is not None:
            return chunked_token_losses(x, kernel, targets, config.loss_chunk_size,
                                        config.final_logit_soft_cap)
        return _logits(x, kernel, config.final_logit_soft_cap)
