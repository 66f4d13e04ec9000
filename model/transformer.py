"""The causal language model: token embedding, pre-norm blocks of local attention and MLP.

Every attention layer is a causal `MultiHeadLocalAttention` (``window_size_left =
window_size``, ``window_size_right = 0``), so a layer's cost is linear in the context and the
model's receptive field is ``num_layers * window_size`` tokens, except the ``global_layers``,
whose window is the whole sequence (Gemma's mix of local and global layers). Parameters carry
logical axis names (``vocab``, ``embed``, ``heads``, ``kv_heads``, ``kv``, ``mlp``, ``layers``)
that the training code maps to mesh axes by rules in the config (MaxText's scheme).
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from model.attention import resolve_implementation
from model.context_parallel import sequence_shards
from model.modules import MultiHeadLocalAttention

POSITION_EMBEDDINGS = ("rope", "relative", "none")
ACTIVATIONS = ("swiglu", "gelu")
NORMS = ("rmsnorm", "layernorm")
DTYPES = ("float32", "bfloat16")
IMPLEMENTATIONS = ("auto", "xla", "dense", "cudnn", "splash")  # model.local_attention backends


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """The model's hyperparameters (hashable, so a module attribute and a static jit arg).

    Built from the ``model`` part of the training config with `TransformerConfig.from_config`.
    """

    vocab_size: int
    num_layers: int = 4
    d_model: int = 256
    num_heads: int = 4
    # Key/value heads, shared by groups of query heads (grouped-query attention; 1: multi-query;
    # None: num_heads). It must divide num_heads.
    num_kv_heads: int | None = None
    head_dim: int | None = None  # default d_model // num_heads
    mlp_dim: int = 1024
    window_size: int = 256
    # Layers that attend to the whole causal context: an int k, every k-th layer (k - 1,
    # 2k - 1, ...; 0: none), or a tuple of layer indices.
    global_layers: int | tuple[int, ...] = 0
    position_embedding: str = "rope"  # one of POSITION_EMBEDDINGS
    rope_base: float = 10_000.0
    activation: str = "swiglu"  # one of ACTIVATIONS
    norm: str = "rmsnorm"  # one of NORMS
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    dtype: str = "float32"  # computation; parameters are float32
    tie_embeddings: bool = True
    remat: bool = False  # recompute each block's activations in the backward pass; bounds
    # memory with scan_layers (unrolled, XLA keeps most activations anyway)
    scan_layers: bool = False  # one scanned block: compile time independent of num_layers
    attention_implementation: str = "auto"  # see model.local_attention
    # Documents per row of packed data that cuDNN's packed layout makes room for (a static
    # bound; train.py checks each batch against it where cuDNN runs).
    max_documents_per_row: int = 32
    # Tokens per chunk of the sequence, so that no (tokens x mlp_dim) or (tokens x vocab_size)
    # array exists whole. layer_chunk_size: each scanned rematerialised layer (scan_layers and
    # remat) runs chunk by chunk, each chunk with the window_size tokens before it (0: the
    # whole sequence at once; it must divide seq_len). loss_chunk_size: the output logits and
    # cross-entropy when the model is given targets (0: about 2**24 logits per chunk).
    layer_chunk_size: int = 0
    loss_chunk_size: int = 0

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict | dict, **overrides) -> TransformerConfig:
        """Validates ``config`` (the ``model`` part of a training config) and builds the config.

        Raises a one-line ValueError naming the first bad or unknown field.
        """
        values = dict(config) | overrides
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"model.{unknown[0]}: unknown model config field; expected one of "
                             f"{sorted(known)}")
        if "vocab_size" not in values:
            raise ValueError("model.vocab_size is missing: expected the tokenizer's vocabulary size")
        if isinstance(values.get("global_layers"), list):  # a JSON round trip gives lists
            values["global_layers"] = tuple(values["global_layers"])
        built = cls(**values)
        built.validate()
        return built

    @property
    def resolved_head_dim(self) -> int:
        return self.d_model // self.num_heads if self.head_dim is None else self.head_dim

    @property
    def resolved_num_kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def global_layer_indices(self) -> tuple[int, ...]:
        """The indices of the global layers, ascending."""
        if isinstance(self.global_layers, numbers.Integral):
            every = int(self.global_layers)
            return tuple(range(every - 1, self.num_layers, every)) if every else ()
        return tuple(sorted(self.global_layers))

    @property
    def compute_dtype(self) -> Any:
        return jnp.dtype(self.dtype)

    def document_bound(self, backend: str | None = None) -> int:
        """``max_documents_per_row`` where the attention runs on cuDNN's packed layout with
        packed documents (on ``backend``, default JAX's), else 0: no bound to check."""
        implementation = resolve_implementation(
            self.attention_implementation, self.compute_dtype,
            has_rel_pos_emb=self.position_embedding == "relative",
            dropout_rate=self.attention_dropout_rate, has_segment_ids=True,
            max_segments=self.max_documents_per_row, backend=backend)
        return self.max_documents_per_row if implementation == "cudnn" else 0

    def validate(self) -> None:
        def is_int(value):
            return isinstance(value, numbers.Integral) and not isinstance(value, bool)

        for name in ("vocab_size", "num_layers", "d_model", "num_heads", "mlp_dim",
                     "max_documents_per_row"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"model.{name}={value!r}: expected a positive int")
        for name in ("window_size", "layer_chunk_size", "loss_chunk_size"):
            value = getattr(self, name)
            if not is_int(value) or value < 0:
                raise ValueError(f"model.{name}={value!r}: expected an int >= 0")
        if self.num_kv_heads is not None and (not is_int(self.num_kv_heads)
                                              or self.num_kv_heads < 1
                                              or self.num_heads % self.num_kv_heads):
            raise ValueError(f"model.num_kv_heads={self.num_kv_heads!r}: expected None or a "
                             f"positive divisor of model.num_heads={self.num_heads}")
        layers = self.global_layers
        if is_int(layers):
            if not 0 <= layers <= self.num_layers:
                raise ValueError(f"model.global_layers={layers!r}: expected an int k in 0.."
                                 f"{self.num_layers} (every k-th layer; 0: none) or a tuple of "
                                 f"layer indices")
        elif not (isinstance(layers, tuple) and all(is_int(i) and 0 <= i < self.num_layers
                                                    for i in layers)
                  and len(set(layers)) == len(layers)):
            raise ValueError(f"model.global_layers={layers!r}: expected an int k (every k-th "
                             f"layer; 0: none) or a tuple of distinct layer indices in "
                             f"0..{self.num_layers - 1}")
        if self.global_layer_indices and self.position_embedding == "relative":
            raise ValueError("model.global_layers needs model.position_embedding 'rope' or "
                             "'none': relative position embeddings are learned per window "
                             "offset, and a global layer's window is the whole sequence")
        if self.head_dim is not None and (not is_int(self.head_dim) or self.head_dim < 1):
            raise ValueError(f"model.head_dim={self.head_dim!r}: expected a positive int or None")
        if self.head_dim is None and self.d_model % self.num_heads:
            raise ValueError(f"model.d_model={self.d_model} is not divisible by "
                             f"model.num_heads={self.num_heads}; set model.head_dim")
        for name, allowed in (("position_embedding", POSITION_EMBEDDINGS),
                              ("activation", ACTIVATIONS), ("norm", NORMS), ("dtype", DTYPES),
                              ("attention_implementation", IMPLEMENTATIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"model.{name}={getattr(self, name)!r}: expected one of "
                                 f"{list(allowed)}")
        if self.position_embedding == "rope" and self.resolved_head_dim % 2:
            raise ValueError(f"model.position_embedding='rope' needs an even head dim; got "
                             f"{self.resolved_head_dim}")
        if self.attention_implementation not in ("auto", "xla") and (
                self.position_embedding == "relative" or self.attention_dropout_rate):
            raise ValueError(f"model.attention_implementation={self.attention_implementation!r} "
                             f"supports neither relative positions nor attention dropout")
        if self.attention_implementation == "cudnn" and self.dtype != "bfloat16":
            raise ValueError(f"model.attention_implementation='cudnn' needs "
                             f"model.dtype='bfloat16'; got {self.dtype!r}")
        for name in ("dropout_rate", "attention_dropout_rate", "rope_base"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or isinstance(value, bool):
                raise ValueError(f"model.{name}={value!r}: expected a number")
        for name in ("dropout_rate", "attention_dropout_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"model.{name}={getattr(self, name)!r}: expected a float in [0, 1)")
        if self.rope_base <= 1:
            raise ValueError(f"model.rope_base={self.rope_base!r}: expected a number > 1")


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


def _norm(config: TransformerConfig, name: str) -> nn.Module:
    scale_init = _init(nn.initializers.ones, "embed")
    if config.norm == "rmsnorm":
        return nn.RMSNorm(dtype=config.compute_dtype, scale_init=scale_init, name=name)
    return nn.LayerNorm(dtype=config.compute_dtype, scale_init=scale_init,
                        bias_init=_init(nn.initializers.zeros, "embed"), name=name)


class Mlp(nn.Module):
    """``(batch, seq_len, d_model) -> (batch, seq_len, d_model)``: SwiGLU or GELU."""

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
        else:
            hidden = nn.gelu(up("up"))
        hidden = nn.Dropout(config.dropout_rate)(hidden, deterministic=deterministic)
        return dense(config.d_model, kernel_init=_init(_DENSE_INIT, "mlp", "embed"),
                     name="down")(hidden).reshape(shape)


class DecoderBlock(nn.Module):
    """Pre-norm residual block: ``x + attention(norm(x))``, then ``x + mlp(norm(x))``.

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
        kv_heads_name = "kv_heads" if config.resolved_num_kv_heads < config.num_heads else "heads"
        attention = MultiHeadLocalAttention(
            num_heads=config.num_heads,
            num_kv_heads=config.resolved_num_kv_heads,
            qkv_features=config.num_heads * head_dim,
            window_size_left=window,
            window_size_right=0,
            use_rel_pos_emb=config.position_embedding == "relative",
            rotary_base=config.rope_base if config.position_embedding == "rope" else None,
            dtype=config.compute_dtype,
            dropout_rate=config.attention_dropout_rate,
            deterministic=deterministic,
            use_bias=False,
            kernel_init=_init(_DENSE_INIT, "embed", "heads", "kv"),
            kv_kernel_init=_init(_DENSE_INIT, "embed", kv_heads_name, "kv"),
            out_kernel_init=_init(_DENSE_INIT, "heads", "kv", "embed"),
            rel_pos_emb_init=_init(nn.initializers.normal(stddev=0.02), "heads", None, "kv"),
            decode=self.decode,
            implementation=config.attention_implementation,
            max_segments=config.max_documents_per_row,
            name="attention")
        hidden = attention(_norm(config, "attention_norm")(x), segment_ids=segment_ids,
                           positions=positions)
        x = x + nn.Dropout(config.dropout_rate)(hidden, deterministic=deterministic)
        hidden = Mlp(config, name="mlp")(_norm(config, "mlp_norm")(x), deterministic)
        x = x + nn.Dropout(config.dropout_rate)(hidden, deterministic=deterministic)
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


def _logits(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``x (batch, length, d_model) @ kernel (d_model, vocab)`` in x's dtype -> float32."""
    logits = jnp.dot(x, kernel.astype(x.dtype))
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab")).astype(jnp.float32)


def chunked_token_losses(x: jax.Array, kernel: jax.Array, targets: jax.Array,
                         chunk_size: int) -> jax.Array:
    """Cross-entropy of each target without the whole logits: ``(batch, seq_len)`` float32.

    ``x (batch, seq_len, d_model)``: the final hidden states; ``kernel (d_model, vocab)``: the
    output projection; ``targets (batch, seq_len)`` int. The logits are computed
    ``chunk_size`` tokens at a time (0: about 2**24 logits per chunk) and recomputed in the
    backward pass, so at most one chunk's float32 ``(chunk, vocab)`` logits exist at once.
    """
    chunk_size = chunk_size or max(1, 2**24 // kernel.shape[-1])
    num_chunks = _num_chunks(x.shape[1], chunk_size)

    @jax.checkpoint
    def chunk_losses(chunk):
        x_chunk, targets_chunk = chunk
        return optax.softmax_cross_entropy_with_integer_labels(_logits(x_chunk, kernel),
                                                                targets_chunk)

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
    unstacked, `unstack_layers`, as `model.sampling.generate` does).
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
        x = embed(tokens) * jnp.sqrt(config.d_model).astype(config.compute_dtype)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        x = nn.Dropout(config.dropout_rate)(x, deterministic=deterministic)

        # deterministic is a Python bool: static for remat and broadcast by scan.
        global_layers = config.global_layer_indices
        if config.scan_layers and self.decode and global_layers:
            raise ValueError("decoding with model.global_layers and model.scan_layers needs the "
                             "layers unstacked (model.transformer.unstack_layers, as generate "
                             "does): global and local layers hold caches of different sizes")
        if config.scan_layers and config.remat and not self.decode and not self.is_initializing():
            dropout = not deterministic and (config.dropout_rate or config.attention_dropout_rate)
            x = _layer_stack(config, deterministic, nn.unbox(self.variables["params"]["layers"]),
                             x, segment_ids, positions,
                             self.make_rng("dropout") if dropout else None)
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
                x, segment_ids, positions, deterministic, _is_global(config))
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
            return chunked_token_losses(x, kernel, targets, config.loss_chunk_size)
        return _logits(x, kernel)


def _is_global(config: TransformerConfig) -> jax.Array:
    """``(num_layers,)`` bool: which layers are global."""
    return jnp.isin(jnp.arange(config.num_layers), jnp.array(config.global_layer_indices, int))


def unstack_layers(params, config: TransformerConfig):
    """The parameters of a ``scan_layers`` model (``layers``: each leaf ``(num_layers, ...)``)
    as those of the same model unscanned (``layer_0``, ``layer_1``, ...); others unchanged."""
    params = dict(params)
    stacked = params.pop("layers")
    return params | {f"layer_{i}": jax.tree.map(lambda x, i=i: x[i], stacked)
                     for i in range(config.num_layers)}


def _layer_chunks(config: TransformerConfig, length: int,
                  global_layer: bool = False) -> tuple[int, int, int]:
    """``(num_chunks, chunk, span)``: a layer over ``length`` tokens runs as ``num_chunks``
    chunks of ``chunk`` outputs, each computed from ``span`` tokens (the chunk and the
    ``window_size`` tokens its attention reaches back to). A global layer reaches back to the
    start: it runs whole."""
    chunk = config.layer_chunk_size
    if not chunk or chunk >= length or global_layer:
        return 1, length, length
    if length % chunk:
        raise ValueError(f"model.layer_chunk_size={chunk} does not divide the sequence length "
                         f"{length}: expected a divisor of it, or 0")
    return length // chunk, chunk, min(length, chunk + config.window_size)


def _layer(config: TransformerConfig, deterministic: bool, layer_params, layer, x, segment_ids,
           positions, dropout_key, d_out=None):
    """`_layer_in_chunks` for layer ``layer`` (traced), global or local as the config says
    (a ``lax.cond`` where the model has both)."""
    def run(global_layer: bool):
        return _layer_in_chunks(config, deterministic, layer_params, layer, x, segment_ids,
                                positions, dropout_key, d_out, global_layer)

    if not config.global_layer_indices:
        return run(False)
    return jax.lax.cond(_is_global(config)[layer], lambda: run(True), lambda: run(False))


def _layer_in_chunks(config: TransformerConfig, deterministic: bool, layer_params, layer, x,
                     segment_ids, positions, dropout_key, d_out=None, global_layer=False):
    """One `DecoderBlock` on ``x (batch, seq_len, d_model)``, chunk by chunk (`_layer_chunks`).

    The block is causal with a window of ``window_size`` tokens and otherwise position-wise,
    so each chunk's outputs are exact from its span of inputs. Returns the output; given the
    output's cotangent ``d_out``, returns ``(d_params, d_x)`` instead, one chunk's backward
    pass at a time (``d_x`` summed in float32 where spans overlap).
    """
    batch, length, _ = x.shape
    num_chunks, chunk, span = _layer_chunks(config, length, global_layer)
    if positions is None:  # a chunk's rotary positions are its place in the sequence
        positions = jnp.arange(length)[None]

    def span_of(index):
        start = jnp.clip(index * chunk - config.window_size, 0, length - span)
        rows = lambda a: None if a is None else jax.lax.dynamic_slice_in_dim(a, start, span, 1)  # noqa: E731
        key = None if dropout_key is None else jax.random.fold_in(
            jax.random.fold_in(dropout_key, layer), index)
        block = lambda p, x: DecoderBlock(config).apply(  # noqa: E731
            {"params": p}, x, rows(segment_ids), rows(positions), deterministic, global_layer,
            rngs=None if key is None else {"dropout": key})
        return start, index * chunk - start, rows(x), block

    if d_out is None:
        def forward(index):
            _, offset, x_span, block = span_of(index)
            return jax.lax.dynamic_slice_in_dim(block(layer_params, x_span), offset, chunk, 1)

        out = jax.lax.map(forward, jnp.arange(num_chunks))  # (num_chunks, batch, chunk, d)
        return jnp.moveaxis(out, 0, 1).reshape(x.shape)

    def backward(sums, index):
        d_params_sum, d_x_sum = sums
        start, offset, x_span, block = span_of(index)
        out, block_vjp = jax.vjp(block, layer_params, x_span)
        d_out_chunk = jax.lax.dynamic_slice_in_dim(d_out, index * chunk, chunk, 1)
        d_params, d_x = block_vjp(jax.lax.dynamic_update_slice_in_dim(
            jnp.zeros_like(out), d_out_chunk, offset, 1))
        d_x_rows = jax.lax.dynamic_slice_in_dim(d_x_sum, start, span, 1) + d_x
        return (jax.tree.map(jnp.add, d_params_sum, d_params),
                jax.lax.dynamic_update_slice_in_dim(d_x_sum, d_x_rows, start, 1)), None

    zeros = (jax.tree.map(jnp.zeros_like, layer_params), jnp.zeros(x.shape, jnp.float32))
    (d_params, d_x), _ = jax.lax.scan(backward, zeros, jnp.arange(num_chunks))
    return d_params, d_x.astype(x.dtype)


def _bits_dtype(dtype) -> Any:
    return jnp.dtype(f"uint{jnp.dtype(dtype).itemsize * 8}")


def _layer_stack_forward(config, deterministic, params, x, segment_ids, positions, dropout_key):
    def layer(x, inputs):
        index, layer_params = inputs
        out = _layer(config, deterministic, layer_params, index, x, segment_ids, positions,
                     dropout_key)
        return out, jax.lax.bitcast_convert_type(x, _bits_dtype(x.dtype))

    return jax.lax.scan(layer, x, (jnp.arange(config.num_layers), params))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _layer_stack(config, deterministic, params, x, segment_ids, positions, dropout_key):
    """The scanned layers with ``params`` (each leaf stacked ``(num_layers, ...)``) on ``x
    (batch, seq_len, d_model)``, keeping only each layer's input for the backward pass, which
    recomputes the layer from it, chunk by chunk (`_layer_in_chunks`).

    What ``nn.remat`` inside ``nn.scan`` does, with the saved inputs held as raw bits (uint16
    for bfloat16): XLA:CPU widens a bfloat16 array that a loop slices to float32 and hoists
    that copy of all the layers' inputs out of the backward loop; integers it leaves alone.
    """
    return _layer_stack_forward(config, deterministic, params, x, segment_ids, positions,
                                dropout_key)[0]


def _layer_stack_fwd(config, deterministic, params, x, segment_ids, positions, dropout_key):
    out, inputs_bits = _layer_stack_forward(config, deterministic, params, x, segment_ids,
                                            positions, dropout_key)
    return out, (params, inputs_bits, segment_ids, positions, dropout_key)


def _layer_stack_bwd(config, deterministic, residuals, d_out):
    params, inputs_bits, segment_ids, positions, dropout_key = residuals

    def layer(d_x, inputs):
        index, layer_params, x_bits = inputs
        x = jax.lax.bitcast_convert_type(x_bits, d_out.dtype)
        d_params, d_x = _layer(config, deterministic, layer_params, index, x, segment_ids,
                               positions, dropout_key, d_out=d_x)
        return d_x, d_params

    d_x, d_params = jax.lax.scan(layer, d_out, (jnp.arange(config.num_layers), params,
                                                inputs_bits), reverse=True)
    return d_params, d_x, None, None, None


_layer_stack.defvjp(_layer_stack_fwd, _layer_stack_bwd)


def count_parameters(params) -> int:
    """Number of scalars in a parameter tree (boxed or not)."""
    return sum(x.size for x in jax.tree.leaves(nn.unbox(params)))


def training_flops_per_token(config: TransformerConfig, seq_len: int) -> float:
    """Forward+backward FLOPs per token: 6 per matmul weight, plus windowed attention.

    Each token's query scores and mixes at most ``min(window_size + 1, seq_len)`` keys in a
    local layer and ``(seq_len + 1) / 2`` on average in a global (causal) one: 2 matmuls of
    ``2 * heads * head_dim`` FLOPs per key forward, ×3 with the backward. The embedding lookup
    costs nothing; a tied embedding still counts once, as the output matmul.
    """
    head_dim = config.resolved_head_dim
    attention_width = config.num_heads * head_dim
    kv_width = config.resolved_num_kv_heads * head_dim
    per_layer = 2 * config.d_model * (attention_width + kv_width)  # q, out; k, v projections
    per_layer += (3 if config.activation == "swiglu" else 2) * config.d_model * config.mlp_dim
    matmul_weights = config.num_layers * per_layer + config.d_model * config.vocab_size
    num_global = len(config.global_layer_indices)
    keys_seen = ((config.num_layers - num_global) * min(config.window_size + 1, seq_len)
                 + num_global * (seq_len + 1) / 2)
    attention = 3 * 2 * 2 * attention_width * keys_seen
    return 6.0 * matmul_weights + attention
