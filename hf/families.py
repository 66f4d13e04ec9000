"""The Hugging Face model families this project converts, and what each fixes of a model.

A family is a `transformers` architecture (its ``model_type``): what its every model has of
our ``model.*`` fields (`Family.fixed`), and how its ``config.json`` says the rest: which
layers slide (`Family.kinds`), whether RoPE has parameters per layer kind, whether the query
scale and soft-caps are fields, and whether projections are fused into one tensor. hf/config.py
reads and writes config.json from these facts, hf/params.py the tensors.

The conventions are `transformers` 5.24's (``models/<family>/configuration_*.py`` and
``modeling_*.py``); ../docs/huggingface.md has the table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

# What Mistral, Llama, Qwen and Phi-3 fix: a pre-norm block with SwiGLU and RMSNorm, RoPE on
# every layer with one base, no biases, no q/k norm, no caps, unscaled embeddings.
_LLAMA = {"position_embedding": "rope", "activation": "swiglu", "norm": "rmsnorm",
          "block_norms": "pre", "qk_norm": "none", "qkv_bias": False, "attention_scale": None,
          "attention_logit_soft_cap": None, "final_logit_soft_cap": None,
          "scale_embeddings": False}
# Gemma 2's: GeGLU (tanh), its (1 + w) RMSNorm before and after each sublayer, embeddings
# times sqrt(hidden_size); the attention scale and the caps are config.json fields.
_GEMMA = {name: value for name, value in _LLAMA.items()
          if name not in ("attention_scale", "attention_logit_soft_cap", "final_logit_soft_cap")
          } | {"activation": "geglu", "norm": "rmsnorm_plus_one", "block_norms": "sandwich",
               "scale_embeddings": True}
# The defaults of the config.json fields read here, where a family's config class differs
# from Mistral's (transformers 5.24's configuration_*.py).
_GEMMA_DEFAULTS = {"tie_word_embeddings": True, "head_dim": 256, "query_pre_attn_scalar": 256,
                   "hidden_activation": "gelu_pytorch_tanh", "sliding_window": 4096}


@dataclasses.dataclass(frozen=True)
class Family:
    """One `transformers` architecture as this project converts it.

    ``kinds``, how config.json says which layers slide where it has no ``layer_types``:
    ``"every_layer"`` (``sliding_window`` on every layer; ``null``: none), ``"pattern"``
    (every ``pattern``-th layer global, the field ``pattern_field`` overriding the default),
    ``"max_window_layers"`` (Qwen: only if ``use_sliding_window``, the layers from
    ``max_window_layers`` on) or ``"none"`` (Llama: no window).
    """

    model_type: str
    architecture: str
    fixed: Mapping[str, Any]  # model.* fields every model of the family has
    kinds: str
    reads_layer_types: bool = True  # Mistral applies its window to every layer regardless
    pattern: int = 0
    pattern_field: str | None = None
    rope_per_kind: bool = False  # RoPE parameters per layer kind (local base, global scaling)
    query_pre_attn_scalar: bool = False  # the attention scale as Gemma's field
    soft_caps: tuple[str, ...] = ()  # the model.* soft caps it has as fields
    fused_projections: bool = False  # Phi-3: qkv_proj = [q; k; v], gate_up_proj = [gate; up]
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # config.json's

    def default(self, hf: dict, name: str, otherwise: Any = None) -> Any:
        """config.json's ``name`` as the family's config class reads it: its value, else the
        class's default (``defaults``, else ``otherwise``)."""
        value = hf.get(name)
        return value if value is not None else self.defaults.get(name, otherwise)


FAMILIES = {family.model_type: family for family in (
    Family("mistral", "MistralForCausalLM", _LLAMA, "every_layer", reads_layer_types=False),
    Family("ministral", "MinistralForCausalLM", _LLAMA, "every_layer"),
    Family("llama", "LlamaForCausalLM", _LLAMA, "none"),
    Family("gemma2", "Gemma2ForCausalLM", _GEMMA, "pattern", pattern=2,
           query_pre_attn_scalar=True,
           soft_caps=("attention_logit_soft_cap", "final_logit_soft_cap"),
           defaults=_GEMMA_DEFAULTS | {"attn_logit_softcapping": 50.0,
                                       "final_logit_softcapping": 30.0}),
    # transformers 5.24's Gemma 3 applies final_logit_softcapping but never passes
    # attn_logit_softcapping to its attention: an attention cap is refused both ways.
    Family("gemma3_text", "Gemma3ForCausalLM",
           _GEMMA | {"qk_norm": "head", "attention_logit_soft_cap": None}, "pattern",
           pattern=6, pattern_field="sliding_window_pattern", rope_per_kind=True,
           query_pre_attn_scalar=True, soft_caps=("final_logit_soft_cap",),
           defaults=_GEMMA_DEFAULTS | {"rope_theta": 1_000_000.0,
                                       "rope_local_base_freq": 10_000.0}),
    Family("qwen2", "Qwen2ForCausalLM", _LLAMA | {"qkv_bias": True}, "max_window_layers",
           defaults={"max_window_layers": 28, "sliding_window": 4096}),
    Family("qwen3", "Qwen3ForCausalLM", _LLAMA | {"qk_norm": "head"}, "max_window_layers",
           defaults={"max_window_layers": 28, "sliding_window": 4096, "head_dim": 128}),
    Family("olmo3", "Olmo3ForCausalLM", _LLAMA | {"block_norms": "post", "qk_norm": "all"},
           "pattern", pattern=4, rope_per_kind=True,
           defaults={"rms_norm_eps": 1e-5, "rope_theta": 500_000.0, "sliding_window": 4096}),
    Family("phi3", "Phi3ForCausalLM", _LLAMA, "every_layer", reads_layer_types=False,
           fused_projections=True, defaults={"rms_norm_eps": 1e-5}),
)}
# Multimodal families whose language model is one above: its config is ``text_config``, its
# tensors are named under a prefix (hf/params.py), the vision tower is left out.
MULTIMODAL = {"gemma3": "gemma3_text"}
# A model of this project's own (model.hf_model_type '') goes out as Mistral, or Ministral
# where it mixes local and global layers; Mistral, Ministral and Llama imports come back as one.
OWN_FAMILIES = ("mistral", "ministral", "llama")
# Families with local layers that transformers has and this project does not convert yet:
# what each lacks, for the one-line refusal.
NOT_YET = {
    "gpt_oss": "attention sinks, a mixture of experts and MXFP4 weights",
    "cohere2": "global layers without RoPE, a parallel block, interleaved RoPE and logit_scale",
    "qwen2_moe": "a mixture of experts",
    "qwen3_moe": "a mixture of experts",
    "llama4_text": "chunked attention and a mixture of experts",
}


def family_of(hf_model_type: str) -> Family:
    """The family that ``model.hf_model_type`` exports to ('' : Mistral; `OWN_FAMILIES`
    are chosen among by the layers, hf/config.py)."""
    return FAMILIES[hf_model_type or "mistral"]
