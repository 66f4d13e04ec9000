"""The model's hyperparameters: `TransformerConfig`, its allowed values and its validation.

Built from the ``model`` part of the training config (`TransformerConfig.from_config`), which
raises a one-line `UserError` naming the first bad or unknown field.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import jax.numpy as jnp
import ml_collections

from errors import UserError
from model.attention import IMPLEMENTATIONS, resolve_implementation
from model.rope import NO_SCALING, RopeScaling


POSITION_EMBEDDINGS = ("rope", "relative", "none")
ACTIVATIONS = ("swiglu", "gelu")
NORMS = ("rmsnorm", "layernorm")
DTYPES = ("float32", "bfloat16")


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
    # Local layers' RoPE base where it differs from the global layers' (Gemma 3: 10k local, 1M
    # global; None: rope_base). Where set, rope_scaling applies to the global layers only.
    rope_local_base: float | None = None
    rope_scaling: RopeScaling = NO_SCALING  # context extension: model.rope.RopeScaling
    activation: str = "swiglu"  # one of ACTIVATIONS
    norm: str = "rmsnorm"  # one of NORMS
    norm_eps: float = 1e-6  # added to the variance in every norm (Mistral, Llama: 1e-5)
    # Input embeddings multiplied by sqrt(d_model) (Gemma's scheme); Mistral and Llama: False.
    scale_embeddings: bool = True
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

        Raises a one-line `UserError` naming the first bad or unknown field.
        """
        values = dict(config) | overrides
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"model.{unknown[0]}: unknown model config field; expected one of "
                            f"{sorted(known)}")
        if "vocab_size" not in values:
            raise UserError("model.vocab_size is missing: expected the tokenizer's vocabulary size")
        if isinstance(values.get("global_layers"), list):  # a JSON round trip gives lists
            values["global_layers"] = tuple(values["global_layers"])
        if not isinstance(values.get("rope_scaling", NO_SCALING), RopeScaling):
            values["rope_scaling"] = RopeScaling.from_dict(values["rope_scaling"])
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

    def rope(self, global_layer: bool) -> tuple[float, RopeScaling]:
        """The RoPE base and scaling of a global or a local layer (Gemma 3's convention: local
        layers with their own base keep it unscaled)."""
        if global_layer or self.rope_local_base is None:
            return self.rope_base, self.rope_scaling
        return self.rope_local_base, NO_SCALING

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
                raise UserError(f"model.{name}={value!r}: expected a positive int")
        for name in ("window_size", "layer_chunk_size", "loss_chunk_size"):
            value = getattr(self, name)
            if not is_int(value) or value < 0:
                raise UserError(f"model.{name}={value!r}: expected an int >= 0")
        if self.num_kv_heads is not None and (not is_int(self.num_kv_heads)
                                              or self.num_kv_heads < 1
                                              or self.num_heads % self.num_kv_heads):
            raise UserError(f"model.num_kv_heads={self.num_kv_heads!r}: expected None or a "
                            f"positive divisor of model.num_heads={self.num_heads}")
        layers = self.global_layers
        if is_int(layers):
            if not 0 <= layers <= self.num_layers:
                raise UserError(f"model.global_layers={layers!r}: expected an int k in 0.."
                                f"{self.num_layers} (every k-th layer; 0: none) or a tuple of "
                                f"layer indices")
        elif not (isinstance(layers, tuple) and all(is_int(i) and 0 <= i < self.num_layers
                                                    for i in layers)
                  and len(set(layers)) == len(layers)):
            raise UserError(f"model.global_layers={layers!r}: expected an int k (every k-th "
                            f"layer; 0: none) or a tuple of distinct layer indices in "
                            f"0..{self.num_layers - 1}")
        if self.global_layer_indices and self.position_embedding == "relative":
            raise UserError("model.global_layers needs model.position_embedding 'rope' or "
                            "'none': relative position embeddings are learned per window "
                            "offset, and a global layer's window is the whole sequence")
        if self.head_dim is not None and (not is_int(self.head_dim) or self.head_dim < 1):
            raise UserError(f"model.head_dim={self.head_dim!r}: expected a positive int or None")
        if self.head_dim is None and self.d_model % self.num_heads:
            raise UserError(f"model.d_model={self.d_model} is not divisible by "
                            f"model.num_heads={self.num_heads}; set model.head_dim")
        for name, allowed in (("position_embedding", POSITION_EMBEDDINGS),
                              ("activation", ACTIVATIONS), ("norm", NORMS), ("dtype", DTYPES),
                              ("attention_implementation", IMPLEMENTATIONS)):
            if getattr(self, name) not in allowed:
                raise UserError(f"model.{name}={getattr(self, name)!r}: expected one of "
                                f"{list(allowed)}")
        if self.position_embedding == "rope" and self.resolved_head_dim % 2:
            raise UserError(f"model.position_embedding='rope' needs an even head dim; got "
                            f"{self.resolved_head_dim}")
        if self.attention_implementation not in ("auto", "xla") and (
                self.position_embedding == "relative" or self.attention_dropout_rate):
            raise UserError(f"model.attention_implementation={self.attention_implementation!r} "
                            f"supports neither relative positions nor attention dropout")
        if self.attention_implementation == "cudnn" and self.dtype != "bfloat16":
            raise UserError(f"model.attention_implementation='cudnn' needs "
                            f"model.dtype='bfloat16'; got {self.dtype!r}")
        for name in ("dropout_rate", "attention_dropout_rate", "rope_base", "norm_eps"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or isinstance(value, bool):
                raise UserError(f"model.{name}={value!r}: expected a number")
        for name in ("dropout_rate", "attention_dropout_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"model.{name}={getattr(self, name)!r}: expected a float in [0, 1)")
        for name in ("rope_base", "rope_local_base"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, numbers.Real)
                                      or isinstance(value, bool) or not value > 1):
                raise UserError(f"model.{name}={value!r}: expected a number > 1")
        if not self.norm_eps > 0:
            raise UserError(f"model.norm_eps={self.norm_eps!r}: expected a number > 0")
        if not isinstance(self.scale_embeddings, bool):
            raise UserError(f"model.scale_embeddings={self.scale_embeddings!r}: expected a bool")
        self.rope_scaling.validate()
