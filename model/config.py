"""The model's hyperparameters: `TransformerConfig`, its allowed values and its validation.

Built from the ``model`` part of the training config (`TransformerConfig.from_config`), which
raises a one-line `UserError` naming the first bad or unknown field.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from typing import Any

import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict as ml_config_dict

from errors import UserError
from model.attention import IMPLEMENTATIONS, resolve_implementation
from model.rope import NO_SCALING, RopeScaling


POSITION_EMBEDDINGS = ("rope", "relative", "none")
ACTIVATIONS = ("swiglu", "geglu", "gelu")
NORMS = ("rmsnorm", "rmsnorm_plus_one", "layernorm")
BLOCK_NORMS = ("pre", "sandwich", "post")
QK_NORMS = ("none", "head", "all")
DTYPES = ("float32", "bfloat16")


# What a model field is, for the rules that follow from it (`fields_with_role`):
# - architecture: the parameters and what they mean depend on it: fixed when a run resumes
#   or is loaded for inference, and taken from the source when a run starts from another's
#   (init_from, a workdir or a Hugging Face folder);
# - training: what a step computes, not the parameters' meaning (dropout, precision, the
#   layers' layout): fixed on resume, the run's own on init_from;
# - kernel: how the same numbers are computed (which kernel, which chunks): free to change on
#   resume.
ROLES = ("architecture", "training", "kernel")


def _field(default, role: str, doc: str):
    """A `TransformerConfig` field: its default, `ROLES` entry and meaning, declared once; the
    training config's ``model`` group (`config_dict`), the resume rules (run_config.py) and
    the fields a source gives a run (init_from.py, hf/config.py) all follow from it."""
    return dataclasses.field(default=default, metadata={"role": role, "doc": doc})


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """The model's hyperparameters (hashable, so a module attribute and a static jit arg).

    Built from the ``model`` part of the training config with `TransformerConfig.from_config`;
    each field's meaning is its ``doc`` (``dataclasses.fields(TransformerConfig)``), also in
    docs/model.md. ``vocab_size`` comes from the tokenizer.
    """

    vocab_size: int = _field(dataclasses.MISSING, "architecture",
                             "ids of the vocabulary (the tokenizer's, padded)")
    num_layers: int = _field(4, "architecture", "transformer blocks")
    d_model: int = _field(256, "architecture", "width of the residual stream")
    num_heads: int = _field(4, "architecture", "query heads")
    num_kv_heads: int | None = _field(
        None, "architecture", "key/value heads shared by groups of query heads (grouped-query "
        "attention; 1: multi-query; None: num_heads): a num_heads / num_kv_heads times smaller "
        "decode cache; it must divide num_heads")
    head_dim: int | None = _field(None, "architecture", "features per head; None: "
                                  "d_model // num_heads")
    mlp_dim: int = _field(768, "architecture", "hidden width of the MLP")
    window_size: int = _field(256, "architecture", "keys before each query that a local layer "
                              "sees (the query itself is always seen)")
    global_layers: int | tuple[int, ...] = _field(
        0, "architecture", "layers that attend to the whole causal context: every k-th layer "
        "(k - 1, 2k - 1, ...) for an int k, 0: none; or a tuple of layer indices (a Python "
        "config)")
    position_embedding: str = _field("rope", "architecture",
                                     f"one of {POSITION_EMBEDDINGS}")
    rope_base: float = _field(10_000.0, "architecture", "the rotary embeddings' base")
    rope_local_base: float | None = _field(
        None, "architecture", "local layers' own RoPE base (Gemma 3: 10k local, 1M global); "
        "None: rope_base. Where set, rope_scaling applies to the global layers only")
    rope_scaling: RopeScaling = _field(
        NO_SCALING, "architecture", "context extension, transformers' rope_scaling "
        "(model/rope.py): rope_type default (none), linear (position interpolation by factor) "
        "or yarn (which needs the pretraining context, original_max_position_embeddings)")
    activation: str = _field(
        "swiglu", "architecture", f"the MLP's, one of {ACTIVATIONS}: swiglu silu(gate)·up; "
        "geglu gelu(gate)·up with GELU's tanh approximation (Gemma's gelu_pytorch_tanh); gelu "
        "(not gated, tanh approximation)")
    norm: str = _field(
        "rmsnorm", "architecture", f"every norm's kind, one of {NORMS}: rmsnorm x̂·scale; "
        "rmsnorm_plus_one x̂·(1 + scale), computed in float32 with the scale stored around 0 "
        "(Gemma's RMSNorm, so its checkpoints convert exactly); layernorm (with a bias)")
    block_norms: str = _field(
        "pre", "architecture", f"where each block's norms sit, one of {BLOCK_NORMS}: pre "
        "x + f(norm(x)); sandwich x + norm(f(norm(x))) (Gemma 2 and 3's four norms a layer); "
        "post x + norm(f(x)) (OLMo 2 and 3), for f the attention, then the MLP")
    qk_norm: str = _field(
        "none", "architecture", f"a norm (model.norm's kind) on queries and keys before RoPE, "
        f"one of {QK_NORMS}: over each head's features (Gemma 3, Qwen 3) or over all heads' "
        "features at once (OLMo 3)")
    qkv_bias: bool = _field(False, "architecture", "biases on the query, key and value "
                            "projections, none on the output (Qwen 2)")
    attention_scale: float | None = _field(
        None, "architecture", "what query·key is multiplied by; None: 1/sqrt(head_dim) "
        "(Gemma 2 and 3: query_pre_attn_scalar ** -0.5)")
    attention_logit_soft_cap: float | None = _field(
        None, "architecture", "attention logits s become cap·tanh(s/cap) before the mask, in "
        "every kernel and in decoding (Gemma 2: 50); None: no cap")
    final_logit_soft_cap: float | None = _field(
        None, "architecture", "output logits z become cap·tanh(z/cap): in the loss, "
        "evaluation and sampling (Gemma 2: 30); None: no cap")
    norm_eps: float = _field(1e-6, "architecture", "added to the variance in every norm "
                             "(Mistral and Llama: 1e-5)")
    scale_embeddings: bool = _field(True, "architecture", "input embeddings times "
                                    "sqrt(d_model) (Gemma's scheme); Mistral and Llama: False")
    tie_embeddings: bool = _field(True, "architecture",
                                  "output logits through the embedding matrix")
    hf_model_type: str = _field(
        "", "architecture", "the Hugging Face model_type of the checkpoint the run started "
        "from (hf/families.py), which export writes back; '': a model of this project's "
        "own, exported as Mistral (Ministral with global layers)")
    dropout_rate: float = _field(0.0, "training", "dropout after attention and the MLP")
    attention_dropout_rate: float = _field(0.0, "training", "dropout of attention weights")
    dtype: str = _field("float32", "training", f"computation, one of {DTYPES} (bfloat16 on "
                        "GPU/TPU); parameters stay float32")
    remat: bool = _field(False, "training", "recompute each block's activations in the "
                         "backward pass; bounds memory with scan_layers (unrolled, XLA keeps "
                         "most activations anyway)")
    scan_layers: bool = _field(False, "training", "one scanned block: compile time "
                               "independent of num_layers")
    attention_implementation: str = _field(
        "auto", "kernel", "auto: the fastest exact kernel for the backend (cuDNN on NVIDIA "
        "GPUs, splash on TPUs, the blocked xla kernel on CPUs); or xla, dense, cudnn, splash "
        "(see model.local_attention)")
    max_documents_per_row: int = _field(
        32, "kernel", "room for documents per row in cuDNN's packed layout (where cuDNN runs "
        "on packed documents; a static bound): a batch row with more is a one-line error")
    layer_chunk_size: int = _field(
        0, "kernel", "tokens per chunk of each scanned rematerialised layer (scan_layers and "
        "remat), each chunk with the window_size tokens before it, so that no (tokens x "
        "mlp_dim) array exists whole; 0: the whole sequence; it must divide seq_len")
    loss_chunk_size: int = _field(
        0, "kernel", "tokens per chunk of the output logits and cross-entropy when the model "
        "is given targets; 0: about 2**24 logits per chunk")

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
            max_segments=self.max_documents_per_row,
            has_logit_soft_cap=self.attention_logit_soft_cap is not None, backend=backend)
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
                              ("activation", ACTIVATIONS), ("norm", NORMS),
                              ("block_norms", BLOCK_NORMS), ("qk_norm", QK_NORMS), ("dtype", DTYPES),
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
        if self.attention_implementation == "cudnn" and self.attention_logit_soft_cap:
            raise UserError(f"model.attention_implementation='cudnn' cannot soft-cap attention "
                            f"logits (model.attention_logit_soft_cap="
                            f"{self.attention_logit_soft_cap}): use 'auto' or 'xla'")
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
        for name in ("scale_embeddings", "tie_embeddings", "qkv_bias"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"model.{name}={getattr(self, name)!r}: expected a bool")
        for name in ("attention_scale", "attention_logit_soft_cap", "final_logit_soft_cap"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, numbers.Real)
                                      or isinstance(value, bool) or not 0 < value < math.inf):
                raise UserError(f"model.{name}={value!r}: expected a positive number or None")
        if not isinstance(self.hf_model_type, str):
            raise UserError(f"model.hf_model_type={self.hf_model_type!r}: expected a string")
        self.rope_scaling.validate()


def fields_with_role(role: str) -> tuple[str, ...]:
    """The names of `TransformerConfig`'s fields of ``role`` (one of `ROLES`), in declaration
    order, ``vocab_size`` (the tokenizer's) left out."""
    return tuple(field.name for field in dataclasses.fields(TransformerConfig)
                 if field.metadata["role"] == role and field.name != "vocab_size")


def config_dict() -> ml_collections.ConfigDict:
    """The training config's ``model`` group: every `TransformerConfig` field but
    ``vocab_size`` at its default, typed so that ``--config.model.FIELD=VALUE`` parses (a
    None default is a placeholder of its type; ``global_layers`` takes an int or a tuple;
    ``rope_scaling`` is a group of `RopeScaling`'s fields)."""
    return _group(TransformerConfig, {field.name: field.default
                                      for field in dataclasses.fields(TransformerConfig)
                                      if field.name != "vocab_size"})


def _group(cls: type, values: dict) -> ml_collections.ConfigDict:
    """``values`` of dataclass ``cls``'s fields as a ConfigDict typed by ``cls``'s hints."""
    hints = typing.get_type_hints(cls)
    group = ml_collections.ConfigDict()
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(value):
            group[name] = _group(type(value), dataclasses.asdict(value))
            continue
        kinds = [kind for kind in typing.get_args(hint) if kind is not type(None)] \
            if isinstance(hint, types.UnionType) else [hint]
        if value is None:
            group[name] = ml_config_dict.placeholder(kinds[0])
        elif len(kinds) > 1:  # e.g. global_layers: an int or a tuple
            group[name] = ml_config_dict.FieldReference(value, field_type=object)
        else:
            group[name] = value
    return group
