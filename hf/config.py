"""``config.json`` of a Hugging Face causal LM to and from this project's ``model.*`` fields.

Import reads each family of `hf.families` (Mistral, Ministral, Llama, Gemma 2 and 3, Qwen 2
and 3, OLMo 3, Phi-3) in both of `transformers`' layouts (5.x: ``rope_parameters``, per
layer kind where the family has kinds, ``dtype``; 4.x: top-level ``rope_theta``,
``rope_scaling`` with ``type`` or ``rope_type``, ``torch_dtype``), absent fields at the
family's config class defaults. The run records the family (``model.hf_model_type``), and
export writes it back in the 4.x layout, which both read, as serving engines pinned to 4.x
expect. A model of this project's own goes out as ``MistralForCausalLM`` (an all-local or
all-global one) or ``MinistralForCausalLM`` (a mix: its ``layer_types`` gives each layer's
kind, where Mistral would apply the window to every layer).

Windows: `transformers`' ``sliding_window = W`` lets the query at ``i`` see keys
``i - W + 1 .. i`` (``masking_utils.sliding_window_overlay``) in every family here; our
``window_size = L`` sees ``i - L .. i``. So ``W = L + 1``.

Anything the target cannot represent (relative position embeddings, LayerNorm, a separate
local RoPE base where the family has one base, ...) is a one-line `UserError` naming it.
"""

from __future__ import annotations

import json
import os

from errors import UserError
from hf.families import FAMILIES, MULTIMODAL, NOT_YET, OWN_FAMILIES, Family, family_of
from model.config import TransformerConfig, fields_with_role
from model.rope import NO_SCALING, RopeScaling

# The model.* fields that an imported config.json (or a source workdir) sets in a run's
# config: the architecture (model/config.py's "architecture" fields; the vocabulary size comes
# with the tokenizer). The rest (dtype, attention implementation, chunking, ...) stay the run's.
IMPORTED_FIELDS = fields_with_role("architecture")
_SCALING_FIELDS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
                   "attention_factor", "mscale", "mscale_all_dim", "truncate")


def read_config_json(folder: str) -> dict:
    """``folder/config.json`` as a dict; a one-line `UserError` where it is missing or not
    JSON."""
    path = os.path.join(folder, "config.json")
    if not os.path.isdir(folder):
        raise UserError(f"{folder!r} is not a folder (expected a Hugging Face model folder "
                        f"with config.json and *.safetensors)")
    try:
        with open(path) as f:
            values = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path} does not exist: expected a Hugging Face model folder") from None
    except (OSError, ValueError) as error:
        raise UserError(f"{path}: cannot read it as JSON ({error})") from None
    if not isinstance(values, dict):
        raise UserError(f"{path}: expected a JSON object")
    return values


def model_fields(hf: dict, source: str = "config.json") -> dict:
    """The ``model.*`` fields (`IMPORTED_FIELDS`) of a ``config.json`` (a dict) of one of
    `hf.families.FAMILIES`, as its `transformers` config class reads it (absent fields at
    that class's defaults). ``source`` names it in the one-line `UserError`s for what this
    project cannot represent."""
    model_type = hf.get("model_type")
    if model_type in MULTIMODAL:  # its language model, exported as the text-only family
        text = hf.get("text_config")
        if not isinstance(text, dict) or text.get("model_type") != MULTIMODAL[model_type]:
            raise UserError(f"{source}: model_type={model_type!r} needs a text_config of "
                            f"model_type {MULTIMODAL[model_type]!r}")
        tied = {"tie_word_embeddings": hf["tie_word_embeddings"]} \
            if hf.get("tie_word_embeddings") is not None else {}
        return model_fields(text | tied, f"{source} (text_config)")
    if model_type in NOT_YET:
        raise UserError(f"{source}: model_type={model_type!r} is not supported yet: it has "
                        f"{NOT_YET[model_type]}")
    if model_type not in FAMILIES:
        raise UserError(f"{source}: model_type={model_type!r}; expected one of "
                        f"{sorted(FAMILIES)}")
    family = FAMILIES[model_type]
    gemma = family.query_pre_attn_scalar
    activation_field = "hidden_activation" if gemma else "hidden_act"
    activation = family.default(hf, activation_field, "silu")
    expected = "gelu_pytorch_tanh" if gemma else "silu"
    if activation != expected:
        raise UserError(f"{source}: {activation_field}={activation!r}; expected {expected!r} "
                        f"(the MLP of {family.architecture})")
    for name in ("attention_bias", "mlp_bias"):
        if hf.get(name):
            raise UserError(f"{source}: {name}=true; expected false (no such biases here)")
    if hf.get("use_bidirectional_attention"):
        raise UserError(f"{source}: use_bidirectional_attention=true; expected a causal model")
    # transformers 5 keeps it in rope_parameters, 4.x at the top level.
    partial = (hf.get("rope_parameters") or {}).get("partial_rotary_factor",
                                                    hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise UserError(f"{source}: partial_rotary_factor={partial!r}; expected 1 (RoPE on "
                        f"every feature)")
    num_layers = _int(hf, "num_hidden_layers", source)
    num_heads = _int(hf, "num_attention_heads", source)
    d_model = _int(hf, "hidden_size", source)
    head_dim = family.default(hf, "head_dim") or d_model // num_heads
    window, global_layers = _windows(hf, family, num_layers, source)
    if family.rope_per_kind:
        base, local_base, scaling = _rope_per_kind(hf, family, source)
    else:
        (base, scaling), local_base = _rope(hf, family.default(hf, "rope_theta", 10_000.0),
                                            source), None
    fields = dict(family.fixed) | {
        "vocab_size": _int(hf, "vocab_size", source),
        "num_layers": num_layers,
        "d_model": d_model,
        "num_heads": num_heads,
        "num_kv_heads": hf.get("num_key_value_heads") or num_heads,
        "head_dim": head_dim,
        "mlp_dim": _int(hf, "intermediate_size", source),
        "window_size": window,
        "global_layers": global_layers,
        "rope_base": base,
        "rope_local_base": local_base,
        "rope_scaling": scaling.as_dict(),
        "norm_eps": float(family.default(hf, "rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(family.default(hf, "tie_word_embeddings", False)),
        "hf_model_type": "" if model_type in OWN_FAMILIES else model_type,
    }
    if gemma:
        fields["attention_scale"] = float(_positive(
            family.default(hf, "query_pre_attn_scalar"), "query_pre_attn_scalar", source)) ** -0.5
    for name, hf_name in _SOFT_CAPS.items():
        cap = family.default(hf, hf_name)
        if name in family.soft_caps:
            fields[name] = None if cap is None else float(_positive(cap, hf_name, source))
        elif cap is not None:
            raise UserError(f"{source}: {hf_name}={cap!r}; expected null ({family.architecture} "
                            f"in transformers 5.24 does not apply it)")
    return fields


# Our soft caps and the config.json fields of Gemma's that hold them.
_SOFT_CAPS = {"attention_logit_soft_cap": "attn_logit_softcapping",
              "final_logit_soft_cap": "final_logit_softcapping"}


def _positive(value, name: str, source: str):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise UserError(f"{source}: {name}={value!r}; expected a positive number")
    return value


def _int(hf: dict, name: str, source: str) -> int:
    value = hf.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"{source}: {name}={value!r}; expected a positive int")
    return value


def _windows(hf: dict, family: Family, num_layers: int, source: str):
    """``(window_size, global_layers)`` as the family's config class derives the layer kinds
    (`Family.kinds`): ``layer_types`` where the family reads it, else its own rule."""
    window = None if family.kinds == "none" else family.default(hf, "sliding_window")
    if family.kinds == "max_window_layers" and not hf.get("use_sliding_window", False):
        window = None  # Qwen: sliding_window is set in the released files, but off
    if window is None:
        return 0, 1  # every layer global
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise UserError(f"{source}: sliding_window={window!r}; expected a positive int or null")
    kinds = hf.get("layer_types") if family.reads_layer_types else None
    if kinds is not None:
        if (not isinstance(kinds, list) or len(kinds) != num_layers
                or set(kinds) - {"sliding_attention", "full_attention"}):
            raise UserError(f"{source}: layer_types={kinds!r}; expected {num_layers} of "
                            f"'sliding_attention' / 'full_attention'")
        return window - 1, tuple(i for i, kind in enumerate(kinds) if kind == "full_attention")
    if family.kinds == "every_layer":
        return window - 1, 0
    if family.kinds == "max_window_layers":  # the layers below it are global
        bound = family.default(hf, "max_window_layers")
        if not isinstance(bound, int) or isinstance(bound, bool) or bound < 0:
            raise UserError(f"{source}: max_window_layers={bound!r}; expected an int >= 0")
        return window - 1, tuple(range(min(bound, num_layers)))
    pattern = (hf.get(family.pattern_field) if family.pattern_field else None) or family.pattern
    if not isinstance(pattern, int) or isinstance(pattern, bool) or pattern < 1:
        raise UserError(f"{source}: {family.pattern_field}={pattern!r}; expected a positive int")
    return window - 1, tuple(i for i in range(num_layers) if (i + 1) % pattern == 0)


def _rope(hf: dict, default_base: float, source: str,
          parameters: dict | None = None) -> tuple[float, RopeScaling]:
    """The RoPE base and scaling from ``rope_parameters`` (transformers 5; or the
    ``parameters`` given, one layer kind's) or ``rope_theta`` and ``rope_scaling`` (4.x, whose
    ``type`` is ``rope_type``'s old name); ``default_base`` where none is given."""
    if parameters is None:
        parameters = hf.get("rope_parameters") or {}
        if any(isinstance(value, dict) for value in parameters.values()):
            raise UserError(f"{source}: rope_parameters per layer type ({sorted(parameters)}) "
                            f"are not supported for model_type={hf.get('model_type')!r}; "
                            f"expected one set for every layer")
        scaling = dict(hf.get("rope_scaling") or parameters)
        base = parameters.get("rope_theta", hf.get("rope_theta", default_base))
    else:
        scaling, base = dict(parameters), parameters.get("rope_theta", default_base)
    rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
    if rope_type == "default":
        return float(base), NO_SCALING
    values = {name: scaling[name] for name in _SCALING_FIELDS if scaling.get(name) is not None}
    if rope_type == "yarn":
        values.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
        if "factor" not in values and values["original_max_position_embeddings"]:
            values["factor"] = (hf["max_position_embeddings"]
                                / values["original_max_position_embeddings"])
    try:
        return float(base), RopeScaling.from_dict({"rope_type": rope_type} | values)
    except (TypeError, ValueError) as error:
        raise UserError(f"{source}: rope scaling {scaling | {'rope_type': rope_type}} is not "
                        f"supported ({error})") from None


def _rope_per_kind(hf: dict, family: Family, source: str) -> tuple[float, float, RopeScaling]:
    """``(rope_base, rope_local_base, rope_scaling)`` of a family with RoPE parameters per
    layer kind (Gemma 3, OLMo 3): transformers 5's ``rope_parameters`` with a
    ``sliding_attention`` and a ``full_attention`` set, or 4.x's ``rope_theta`` and
    ``rope_scaling`` (which apply to the global layers) with Gemma 3's
    ``rope_local_base_freq``. Scaling on local layers is a one-line `UserError`."""
    parameters = hf.get("rope_parameters") or {}
    base = family.default(hf, "rope_theta", 10_000.0)
    if "full_attention" in parameters or "sliding_attention" in parameters:
        kinds = {kind: parameters.get(kind) or {} for kind in ("full_attention",
                                                               "sliding_attention")}
    else:  # 4.x: rope_scaling on the global layers; Gemma 3's local layers have their own base
        kinds = {"full_attention": dict(hf.get("rope_scaling") or parameters),
                 "sliding_attention": {"rope_theta": family.default(hf, "rope_local_base_freq",
                                                                    base)}}
    kinds["full_attention"].setdefault("rope_theta", base)
    local_default = family.default(hf, "rope_local_base_freq", base)
    global_base, scaling = _rope(hf, base, source, kinds["full_attention"])
    local_base, local_scaling = _rope(hf, local_default, source, kinds["sliding_attention"])
    if local_scaling != NO_SCALING:
        raise UserError(f"{source}: rope scaling on sliding_attention layers "
                        f"({kinds['sliding_attention']}) is not supported; expected it on "
                        f"full_attention layers only")
    return global_base, local_base, scaling


def hf_config(config: TransformerConfig, max_position_embeddings: int, end_of_document_id: int,
              pad_id: int, begin_of_document_id: int | None = None) -> dict:
    """The ``config.json`` (4.x layout, which transformers 5 reads too) of ``config``'s model
    in float32: the family ``model.hf_model_type`` names (`hf.families`), or for a model of
    this project's own Mistral, Ministral where it mixes local and global layers. Anything
    the family cannot represent is a one-line `UserError` naming the field.

    ``max_position_embeddings``: the context the model was trained at (with YaRN, the
    extended one: ``factor * original_max_position_embeddings``, as transformers expects).
    The token ids are the tokenizer's (`data.tokenizers.Tokenizer`; a BOS only where it has
    one).
    """
    family = family_of(config.hf_model_type)
    global_layers = config.global_layer_indices
    every_layer_global = len(global_layers) == config.num_layers
    if config.hf_model_type in ("", *OWN_FAMILIES) and global_layers and not every_layer_global:
        family = FAMILIES["ministral"]  # Mistral would apply the window to every layer
    _check_exportable(config, family)
    scaling = config.rope_scaling
    if scaling.rope_type == "yarn":
        max_position_embeddings = int(scaling.factor * scaling.original_max_position_embeddings)
    gemma = family.query_pre_attn_scalar
    values = {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.mlp_dim,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.resolved_num_kv_heads,
        "head_dim": config.resolved_head_dim,
        "hidden_activation" if gemma else "hidden_act": "gelu_pytorch_tanh" if gemma else "silu",
        "max_position_embeddings": int(max_position_embeddings),
        "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_dropout": 0.0,
        "bos_token_id": begin_of_document_id,
        "eos_token_id": end_of_document_id,
        "pad_token_id": pad_id,
        "torch_dtype": "float32",
        "use_cache": True,
    } | _window_json(config, family) | _rope_json(config, family)
    if family.model_type != "qwen2":  # Qwen 2 has its q/k/v biases without a field
        values["attention_bias"] = False
    if gemma:
        scale = config.attention_scale or config.resolved_head_dim ** -0.5
        scalar = scale ** -2  # the inverse of import's query_pre_attn_scalar ** -0.5
        values["query_pre_attn_scalar"] = round(scalar) if abs(scalar - round(scalar)) < 1e-9 \
            else scalar
    for name, hf_name in _SOFT_CAPS.items():
        if name in family.soft_caps or gemma:
            values[hf_name] = getattr(config, name)
    return values


def _window_json(config: TransformerConfig, family: Family) -> dict:
    """The fields that give the window and each layer's kind, as ``family`` reads them."""
    global_layers = config.global_layer_indices
    if len(global_layers) == config.num_layers:  # no local layer
        values = {"sliding_window": None}
        if family.kinds == "max_window_layers":
            values["use_sliding_window"] = False
        return values
    kinds = ["full_attention" if i in global_layers else "sliding_attention"
             for i in range(config.num_layers)]
    values = {"sliding_window": config.window_size + 1}
    if family.reads_layer_types:
        values["layer_types"] = kinds
    if family.kinds == "max_window_layers":
        # The layers below max_window_layers are global (what a reader without layer_types
        # derives; the same kinds).
        values |= {"use_sliding_window": True, "max_window_layers": len(global_layers)}
    elif family.kinds == "pattern" and family.pattern_field:
        values[family.pattern_field] = family.pattern  # overridden by layer_types
    return values


def _rope_json(config: TransformerConfig, family: Family) -> dict:
    """``rope_theta`` and ``rope_scaling`` (4.x). Families with RoPE per layer kind apply
    ``rope_scaling`` to the global layers only, and get transformers 5's per-kind
    ``rope_parameters`` too: 5.24 reads OLMo 3's 4.x ``rope_theta`` for the global layers
    alone (its local ones fall back to the class default), and Gemma 3's local base is
    ``rope_local_base_freq`` in 4.x."""
    values = {"rope_theta": config.rope_base, "rope_scaling": _scaling_json(config.rope_scaling)}
    if family.rope_per_kind:
        local_base = config.rope(global_layer=False)[0]
        values["rope_parameters"] = {
            "sliding_attention": {"rope_type": "default", "rope_theta": local_base},
            "full_attention": (values["rope_scaling"] or {"rope_type": "default"})
            | {"rope_theta": config.rope_base}}
        if family.model_type == "gemma3_text":
            values["rope_local_base_freq"] = local_base
    return values


def _scaling_json(scaling: RopeScaling) -> dict | None:
    if scaling.rope_type == "default":
        return None
    if scaling.rope_type == "linear":
        return {"rope_type": "linear", "type": "linear", "factor": scaling.factor}
    values = {name: getattr(scaling, name) for name in _SCALING_FIELDS}
    return {"rope_type": "yarn", "type": "yarn"} | {k: v for k, v in values.items()
                                                    if v is not None}


def _check_exportable(config: TransformerConfig, family: Family) -> None:
    """A one-line `UserError` naming the first ``model.*`` field that ``family`` cannot
    express; None where it can express them all."""
    def refuse(field, why):
        raise UserError(f"model.{field}={getattr(config, field)!r} cannot be exported as "
                        f"{family.architecture}: {why}")

    own = family.model_type in OWN_FAMILIES
    for field, value in family.fixed.items():
        if own and field == "scale_embeddings":
            continue  # folded into the weights (hf/params.py)
        if getattr(config, field) != value:
            refuse(field, f"its {field} is {value!r}")
    local_layers = [i for i in range(config.num_layers) if i not in config.global_layer_indices]
    mixed = 0 < len(local_layers) < config.num_layers
    if mixed and family.kinds == "every_layer" and not family.reads_layer_types:
        refuse("global_layers", "it applies the window to every layer")
    if mixed and family.kinds == "max_window_layers" \
            and config.global_layer_indices != tuple(range(len(config.global_layer_indices))):
        refuse("global_layers", "its global layers are the first max_window_layers")
    local_base, local_scaling = config.rope(global_layer=False)
    if local_layers and (local_base, local_scaling) != (config.rope_base, config.rope_scaling):
        if not family.rope_per_kind:
            refuse("rope_local_base", "it has one RoPE base and scaling for every layer")
        if local_scaling != NO_SCALING:  # rope_local_base None: the scaling is everywhere
            refuse("rope_scaling", "it scales the global layers' RoPE only (set "
                   "model.rope_local_base)")
        if family.model_type == "olmo3" and local_base != config.rope_base:
            refuse("rope_local_base", "its local layers have the global layers' RoPE base")
