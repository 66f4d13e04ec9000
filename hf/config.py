"""``config.json`` of a Hugging Face causal LM to and from this project's ``model.*`` fields.

Import reads the Mistral, Ministral and Llama layouts, in both of `transformers`' forms
(5.x: ``rope_parameters``, ``dtype``; 4.x: top-level ``rope_theta``, ``rope_scaling`` with
``type`` or ``rope_type``, ``torch_dtype``). Export writes the 4.x form, which both read, as
serving engines pinned to 4.x expect:

- an all-local model, or an all-global one (``sliding_window: null``), as ``MistralForCausalLM``;
- a mix of local and global layers as ``MinistralForCausalLM``, whose ``layer_types`` gives
  each layer's kind (Mistral would apply the window to every layer).

Windows: `transformers`' ``sliding_window = W`` lets the query at ``i`` see keys
``i - W + 1 .. i`` (``masking_utils.sliding_window_overlay``); our ``window_size = L`` sees
``i - L .. i``. So ``W = L + 1``.

Anything the target cannot represent (relative position embeddings, GELU MLPs, LayerNorm, a
separate local RoPE base, biases, ...) is a one-line `UserError` naming it.
"""

from __future__ import annotations

import json
import os

from errors import UserError
from model.config import TransformerConfig, fields_with_role
from model.rope import NO_SCALING, RopeScaling

IMPORTED_MODEL_TYPES = ("mistral", "ministral", "llama")
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
    """The ``model.*`` fields (`IMPORTED_FIELDS`) of a Mistral, Ministral or Llama
    ``config.json`` (a dict). ``source`` names it in the one-line `UserError`s for what this
    project cannot represent."""
    model_type = hf.get("model_type")
    if model_type not in IMPORTED_MODEL_TYPES:
        raise UserError(f"{source}: model_type={model_type!r}; expected one of "
                        f"{list(IMPORTED_MODEL_TYPES)} (a Mistral/Llama-shaped model)")
    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"{source}: hidden_act={hf['hidden_act']!r}; expected 'silu' (SwiGLU)")
    for name in ("attention_bias", "mlp_bias"):
        if hf.get(name):
            raise UserError(f"{source}: {name}=true; this project's layers have no biases")
    # transformers 5 keeps it in rope_parameters, 4.x at the top level.
    partial = (hf.get("rope_parameters") or {}).get("partial_rotary_factor",
                                                    hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise UserError(f"{source}: partial_rotary_factor={partial!r}; expected 1 (RoPE on "
                        f"every feature)")
    num_layers = _int(hf, "num_hidden_layers", source)
    num_heads = _int(hf, "num_attention_heads", source)
    d_model = _int(hf, "hidden_size", source)
    window, global_layers = _windows(hf, model_type, num_layers, source)
    base, scaling = _rope(hf, source)
    return {
        "vocab_size": _int(hf, "vocab_size", source),
        "num_layers": num_layers,
        "d_model": d_model,
        "num_heads": num_heads,
        "num_kv_heads": hf.get("num_key_value_heads") or num_heads,
        "head_dim": hf.get("head_dim") or d_model // num_heads,
        "mlp_dim": _int(hf, "intermediate_size", source),
        "window_size": window,
        "global_layers": global_layers,
        "position_embedding": "rope",
        "rope_base": base,
        "rope_local_base": None,
        "rope_scaling": scaling.as_dict(),
        "activation": "swiglu",
        "norm": "rmsnorm",
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "scale_embeddings": False,
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
    }


def _int(hf: dict, name: str, source: str) -> int:
    value = hf.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"{source}: {name}={value!r}; expected a positive int")
    return value


def _windows(hf: dict, model_type: str, num_layers: int, source: str):
    """``(window_size, global_layers)``: Llama has no window; Mistral windows every layer
    (``sliding_window: null``: none); Ministral windows the layers ``layer_types`` calls
    ``sliding_attention``."""
    window = hf.get("sliding_window") if model_type != "llama" else None
    if window is None:
        return 0, 1  # every layer global
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise UserError(f"{source}: sliding_window={window!r}; expected a positive int or null")
    kinds = hf.get("layer_types") if model_type == "ministral" else None
    if kinds is None:
        return window - 1, 0
    if (not isinstance(kinds, list) or len(kinds) != num_layers
            or set(kinds) - {"sliding_attention", "full_attention"}):
        raise UserError(f"{source}: layer_types={kinds!r}; expected {num_layers} of "
                        f"'sliding_attention' / 'full_attention'")
    return window - 1, tuple(i for i, kind in enumerate(kinds) if kind == "full_attention")


def _rope(hf: dict, source: str) -> tuple[float, RopeScaling]:
    """The RoPE base and scaling from ``rope_parameters`` (transformers 5) or ``rope_theta``
    and ``rope_scaling`` (4.x, whose ``type`` is ``rope_type``'s old name)."""
    parameters = hf.get("rope_parameters") or {}
    if any(isinstance(value, dict) for value in parameters.values()):
        raise UserError(f"{source}: rope_parameters per layer type ({sorted(parameters)}) are "
                        f"not supported; expected one set for every layer")
    scaling = dict(hf.get("rope_scaling") or parameters)
    base = parameters.get("rope_theta", hf.get("rope_theta", 10_000.0))
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


def hf_config(config: TransformerConfig, max_position_embeddings: int, end_of_document_id: int,
              pad_id: int) -> dict:
    """The ``config.json`` (4.x layout) of ``config``'s model in float32, or a one-line
    `UserError` naming what `transformers`' Mistral and Ministral cannot represent.

    ``max_position_embeddings``: the context the model was trained at (with YaRN, the
    extended one: ``factor * original_max_position_embeddings``, as transformers expects).
    """
    _check_exportable(config)
    global_layers = config.global_layer_indices
    every_layer_global = len(global_layers) == config.num_layers
    mixed = bool(global_layers) and not every_layer_global
    scaling = config.rope_scaling
    if scaling.rope_type == "yarn":
        max_position_embeddings = int(scaling.factor * scaling.original_max_position_embeddings)
    values = {
        "architectures": ["MinistralForCausalLM" if mixed else "MistralForCausalLM"],
        "model_type": "ministral" if mixed else "mistral",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.mlp_dim,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.resolved_num_kv_heads,
        "head_dim": config.resolved_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(max_position_embeddings),
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_base,
        "rope_scaling": _scaling_json(scaling),
        "sliding_window": None if every_layer_global else config.window_size + 1,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_dropout": 0.0,
        "bos_token_id": None,
        "eos_token_id": end_of_document_id,
        "pad_token_id": pad_id,
        "torch_dtype": "float32",
        "use_cache": True,
    }
    if mixed:
        values["layer_types"] = ["full_attention" if i in global_layers else "sliding_attention"
                                 for i in range(config.num_layers)]
    return values


def _scaling_json(scaling: RopeScaling) -> dict | None:
    if scaling.rope_type == "default":
        return None
    if scaling.rope_type == "linear":
        return {"rope_type": "linear", "type": "linear", "factor": scaling.factor}
    values = {name: getattr(scaling, name) for name in _SCALING_FIELDS}
    return {"rope_type": "yarn", "type": "yarn"} | {k: v for k, v in values.items()
                                                    if v is not None}


def _check_exportable(config: TransformerConfig) -> None:
    def refuse(field, why):
        raise UserError(f"model.{field}={getattr(config, field)!r} cannot be exported: {why}")

    if config.position_embedding != "rope":
        refuse("position_embedding", "transformers' Mistral has rotary position embeddings only")
    if config.activation != "swiglu":
        refuse("activation", "transformers' Mistral has a SwiGLU MLP only")
    if config.norm != "rmsnorm":
        refuse("norm", "transformers' Mistral has RMSNorm only")
    local_layers = len(config.global_layer_indices) < config.num_layers
    if local_layers and config.rope_local_base is not None and (
            config.rope_local_base != config.rope_base or config.rope_scaling != NO_SCALING):
        refuse("rope_local_base", "no Llama-shaped transformers architecture has a RoPE base "
               "(or scaling) for local layers apart from the global ones")
