"""The causal language model: token embedding, pre-norm blocks of local attention and MLP.

Every attention layer is a causal `MultiHeadLocalAttention` (``window_size_left =
window_size``, ``window_size_right = 0``), so a layer's cost is linear in the context and the
model's receptive field is ``num_layers * window_size`` tokens. Parameters carry logical axis
names (``vocab``, ``embed``, ``heads``, ``kv``, ``mlp``, ``layers``) that the training code maps
to mesh axes by rules in the config (MaxText's scheme).
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

from model.attention import resolve_implementation
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
    head_dim: int | None = None  # default d_model // num_heads
    mlp_dim: int = 1024
    window_size: int = 256
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
        built = cls(**values)
        built.validate()
        return built

    @property
    def resolved_head_dim(self) -> int:
        return self.d_model // self.num_heads if self.head_dim is None else self.head_dim

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
        if not is_int(self.window_size) or self.window_size < 0:
            raise ValueError(f"model.window_size={self.window_size!r}: expected an int >= 0")
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
        dense = functools.partial(nn.Dense, dtype=config.compute_dtype, use_bias=False)
        up = lambda name: dense(config.mlp_dim, kernel_init=_init(_DENSE_INIT, "embed", "mlp"),  # noqa: E731
                                name=name)(x)
        if config.activation == "swiglu":
            hidden = nn.silu(up("gate")) * up("up")
        else:
            hidden = nn.gelu(up("up"))
        hidden = nn.with_logical_constraint(hidden, ("batch", "length", "mlp"))
        hidden = nn.Dropout(config.dropout_rate)(hidden, deterministic=deterministic)
        return dense(config.d_model, kernel_init=_init(_DENSE_INIT, "mlp", "embed"),
                     name="down")(hidden)


class DecoderBlock(nn.Module):
    """Pre-norm residual block: ``x + attention(norm(x))``, then ``x + mlp(norm(x))``."""

    config: TransformerConfig
    decode: bool = False

    @nn.compact
    def __call__(self, x, segment_ids, positions, deterministic: bool):
        config = self.config
        head_dim = config.resolved_head_dim
        attention = MultiHeadLocalAttention(
            num_heads=config.num_heads,
            qkv_features=config.num_heads * head_dim,
            window_size_left=config.window_size,
            window_size_right=0,
            use_rel_pos_emb=config.position_embedding == "relative",
            rotary_base=config.rope_base if config.position_embedding == "rope" else None,
            dtype=config.compute_dtype,
            dropout_rate=config.attention_dropout_rate,
            deterministic=deterministic,
            use_bias=False,
            kernel_init=_init(_DENSE_INIT, "embed", "heads", "kv"),
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


class _ScannedBlock(DecoderBlock):
    """`DecoderBlock` with the ``(carry, _) -> (carry, None)`` signature of ``nn.scan``."""

    @nn.compact
    def __call__(self, x, segment_ids, positions, deterministic: bool):  # type: ignore[override]
        return super().__call__(x, segment_ids, positions, deterministic), None


class TransformerLM(nn.Module):
    """Decoder-only causal language model of local-attention blocks.

    ``__call__(tokens (batch, seq_len) int, segment_ids=None, positions=None,
    deterministic=True) -> logits (batch, seq_len, vocab_size) float32``.

    ``segment_ids`` and ``positions`` (both ``(batch, seq_len)`` int) describe packed documents:
    attention never crosses a segment boundary and positions restart per document. With
    ``decode=True`` the attention layers keep rolling caches (``mutable=['cache']``): the first
    call after ``init`` may hold a whole prompt, each later call one token.
    """

    config: TransformerConfig
    decode: bool = False

    @nn.compact
    def __call__(self, tokens, segment_ids=None, positions=None, deterministic: bool = True):
        config = self.config
        embed = nn.Embed(config.vocab_size, config.d_model, dtype=config.compute_dtype,
                         embedding_init=_init(_EMBED_INIT, "vocab", "embed"), name="embed")
        x = embed(tokens) * jnp.sqrt(config.d_model).astype(config.compute_dtype)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        x = nn.Dropout(config.dropout_rate)(x, deterministic=deterministic)

        # deterministic is a Python bool: static for remat and broadcast by scan.
        if config.scan_layers:
            block = _ScannedBlock
            if config.remat:
                block = nn.remat(block, prevent_cse=False, static_argnums=(4,))
            x, _ = nn.scan(
                block, variable_axes={"params": 0, "cache": 0},
                split_rngs={"params": True, "dropout": True}, in_axes=nn.broadcast,
                length=config.num_layers, metadata_params={nn.PARTITION_NAME: "layers"},
            )(config, decode=self.decode, name="layers")(x, segment_ids, positions, deterministic)
        else:
            block = nn.remat(DecoderBlock, static_argnums=(4,)) if config.remat else DecoderBlock
            for layer in range(config.num_layers):
                x = block(config, decode=self.decode, name=f"layer_{layer}")(
                    x, segment_ids, positions, deterministic)

        x = _norm(config, "final_norm")(x)
        if config.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = nn.Dense(config.vocab_size, use_bias=False, dtype=config.compute_dtype,
                              kernel_init=_init(_DENSE_INIT, "embed", "vocab"), name="logits")(x)
        logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
        return logits.astype(jnp.float32)


def count_parameters(params) -> int:
    """Number of scalars in a parameter tree (boxed or not)."""
    return sum(x.size for x in jax.tree.leaves(nn.unbox(params)))


def training_flops_per_token(config: TransformerConfig, seq_len: int) -> float:
    """Forward+backward FLOPs per token: 6 per matmul weight, plus windowed attention.

    Each token's query scores and mixes at most ``min(window_size + 1, seq_len)`` keys:
    2 matmuls of ``2 * heads * head_dim`` FLOPs per key forward, ×3 with the backward. The
    embedding lookup costs nothing; a tied embedding still counts once, as the output matmul.
    """
    head_dim = config.resolved_head_dim
    attention_width = config.num_heads * head_dim
    per_layer = 4 * config.d_model * attention_width  # q, k, v, out projections
    per_layer += (3 if config.activation == "swiglu" else 2) * config.d_model * config.mlp_dim
    matmul_weights = config.num_layers * per_layer + config.d_model * config.vocab_size
    keys_seen = min(config.window_size + 1, seq_len)
    attention = config.num_layers * 3 * 2 * 2 * attention_width * keys_seen
    return 6.0 * matmul_weights + attention
