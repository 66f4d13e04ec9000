"""hf/config.py: ``config.json`` read in transformers' 5.x and 4.x layouts (the same fields
either way), each layer's kind from Llama, Mistral and Ministral configs, YaRN's implied
fields, one-line errors, and the exported config as transformers' AutoConfig reads it back."""

import json

import numpy as np
import pytest

from hf.config import hf_config, model_fields
from model.config import TransformerConfig
from model.rope import RopeScaling, rope_frequencies

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers.models.mistral.modeling_mistral import MistralRotaryEmbedding  # noqa: E402

SHAPE = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
             max_position_embeddings=8192)


def _v4(model_type="mistral", rope_theta=10_000.0, rope_scaling=None, **overrides):
    """A config.json as transformers 4.x wrote it (top-level rope_theta, rope_scaling,
    torch_dtype), by hand."""
    architecture = {"mistral": "MistralForCausalLM", "ministral": "MinistralForCausalLM",
                    "llama": "LlamaForCausalLM"}[model_type]
    return {"architectures": [architecture], "model_type": model_type, "hidden_act": "silu",
            "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
            "initializer_range": 0.02, "rope_theta": rope_theta, "rope_scaling": rope_scaling,
            "sliding_window": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
            "transformers_version": "4.46.0", "use_cache": True} | SHAPE | overrides


@pytest.mark.parametrize("theta,parameters,old_scaling", [
    (10_000.0, {}, None),
    (1e6, {"rope_type": "linear", "factor": 4.0}, {"type": "linear", "factor": 4.0}),
    (1e6, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048},
     {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}),
    (5e5, {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 1024,
           "beta_fast": 16.0, "beta_slow": 2.0, "mscale": 1.0, "mscale_all_dim": 0.5,
           "truncate": False},
     {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 1024,
      "beta_fast": 16.0, "beta_slow": 2.0, "mscale": 1.0, "mscale_all_dim": 0.5,
      "truncate": False}),
    (1e6, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048,
           "attention_factor": 0.8}, {"type": "yarn", "factor": 4.0, "attention_factor": 0.8,
                                      "original_max_position_embeddings": 2048}),
])
def test_the_5x_and_4x_layouts_give_the_same_fields(theta, parameters, old_scaling):
    new = transformers.MistralConfig(
        rope_parameters={"rope_theta": theta} | parameters, dtype="bfloat16",
        sliding_window=4096, tie_word_embeddings=False, **SHAPE).to_dict()
    assert "rope_parameters" in new and "rope_theta" not in new and "torch_dtype" not in new
    old = _v4(rope_theta=theta, rope_scaling=old_scaling)
    # transformers itself reads the hand-written 4.x dict as the 5.x one (keeping `type`).
    read = transformers.MistralConfig.from_dict(old).rope_parameters
    assert {k: v for k, v in read.items() if k != "type"} == new["rope_parameters"]
    fields = model_fields(new)
    assert fields == model_fields(old)
    assert fields["rope_base"] == theta and fields["window_size"] == 4095
    assert RopeScaling.from_dict(fields["rope_scaling"]) == RopeScaling.from_dict(parameters)


def _kinds(hf):
    """(window_size, global layer indices) of the config built from ``hf``."""
    config = TransformerConfig.from_config(model_fields(hf))
    return config.window_size, config.global_layer_indices


def test_each_layers_kind():
    llama = transformers.LlamaConfig(**SHAPE).to_dict()
    assert _kinds(llama)[1] == (0, 1, 2)
    assert _kinds(llama | {"sliding_window": 512})[1] == (0, 1, 2)  # Llama has no window
    assert _kinds(_v4("llama"))[1] == (0, 1, 2)
    mistral = transformers.MistralConfig(sliding_window=None, **SHAPE).to_dict()
    assert mistral["sliding_window"] is None and _kinds(mistral)[1] == (0, 1, 2)
    assert _kinds(_v4(sliding_window=None))[1] == (0, 1, 2)
    assert _kinds(_v4(sliding_window=512)) == (511, ())
    ministral = transformers.MinistralConfig(
        sliding_window=100, layer_types=["full_attention", "sliding_attention",
                                         "full_attention"], **SHAPE).to_dict()
    assert _kinds(ministral) == (99, (0, 2))
    all_local = transformers.MinistralConfig(sliding_window=9, **SHAPE).to_dict()
    assert all_local["layer_types"] == ["sliding_attention"] * 3
    assert _kinds(all_local) == (8, ())
    assert _kinds(_v4("ministral", sliding_window=1))[0] == 0  # W = 1: the token itself


def test_yarn_without_factor_or_original_length():
    """As transformers: the factor is max_position_embeddings over the original length, and
    the original length defaults to max_position_embeddings."""
    def scaling(values, **overrides):
        return RopeScaling.from_dict(model_fields(_v4(rope_scaling=values, **overrides))
                                     ["rope_scaling"])

    implied = scaling({"type": "yarn", "original_max_position_embeddings": 2048})
    assert implied.factor == 4.0 and implied.original_max_position_embeddings == 2048
    implied = scaling({"rope_type": "yarn", "original_max_position_embeddings": 3000},
                      max_position_embeddings=12_000)
    assert implied.factor == 4.0
    original = scaling({"type": "yarn", "factor": 4.0})
    assert original.original_max_position_embeddings == 8192 and original.factor == 4.0
    neither = scaling({"type": "yarn"})
    assert neither.original_max_position_embeddings == 8192 and neither.factor == 1.0


@pytest.mark.parametrize("overrides,message", [
    ({"rope_scaling": None, "rope_parameters": {
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
     "config.json: rope_parameters per layer type (['full_attention', 'sliding_attention']) "
     "are not supported"),
    ({"attention_bias": True}, "config.json: attention_bias=true; expected false"),
    ({"mlp_bias": True}, "config.json: mlp_bias=true"),
    ({"partial_rotary_factor": 0.5}, "config.json: partial_rotary_factor=0.5; expected 1"),
    ({"model_type": "ministral", "layer_types": ["full_attention", "sliding_attention"]},
     "config.json: layer_types=['full_attention', 'sliding_attention']; expected 3 of"),
    ({"model_type": "ministral", "layer_types": ["full_attention", "chunked_attention",
                                                 "full_attention"]},
     "config.json: layer_types=['full_attention', 'chunked_attention', 'full_attention']; "
     "expected 3 of"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}},
     "config.json: rope scaling {'factor': 2.0, 'rope_type': 'dynamic'} is not supported "
     "(model.rope_scaling.rope_type='dynamic': expected one of"),
    ({"rope_scaling": None, "rope_parameters": {"rope_type": "llama3", "factor": 8.0}},
     "config.json: rope scaling {'factor': 8.0, 'rope_type': 'llama3'} is not supported"),
    ({"num_hidden_layers": 0}, "config.json: num_hidden_layers=0; expected a positive int"),
    ({"sliding_window": 0}, "config.json: sliding_window=0; expected a positive int or null"),
    ({"hidden_act": "gelu_pytorch_tanh"}, "config.json: hidden_act='gelu_pytorch_tanh'"),
])
def test_what_cannot_be_imported_is_a_one_line_error(overrides, message):
    with pytest.raises(ValueError) as error:
        model_fields(_v4() | overrides)
    assert str(error.value).startswith(message) and "\n" not in str(error.value), \
        str(error.value)


def test_a_partial_rotary_factor_inside_rope_parameters_is_refused():
    """transformers 5 moves ``partial_rotary_factor`` into ``rope_parameters``."""
    hf = transformers.LlamaConfig(partial_rotary_factor=0.5, **SHAPE).to_dict()
    assert hf["rope_parameters"]["partial_rotary_factor"] == 0.5
    assert "partial_rotary_factor" not in hf
    with pytest.raises(ValueError, match="partial_rotary_factor=0.5"):
        model_fields(hf)


YARN = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16}


def _ours(**overrides):
    return TransformerConfig.from_config(dict(
        vocab_size=384, num_layers=3, d_model=48, num_heads=4, num_kv_heads=2, mlp_dim=80,
        window_size=7, rope_base=5000.0, norm_eps=1e-5, scale_embeddings=False) | overrides)


@pytest.mark.parametrize("overrides,architecture,window,layer_types", [
    ({}, "MistralForCausalLM", 8, None),
    ({"tie_embeddings": False, "head_dim": 16, "window_size": 31},
     "MistralForCausalLM", 32, None),
    ({"global_layers": (1,), "rope_scaling": {"rope_type": "linear", "factor": 4.0}},
     "MinistralForCausalLM", 8, ["sliding_attention", "full_attention", "sliding_attention"]),
    ({"global_layers": 2, "tie_embeddings": False, "rope_scaling": YARN},
     "MinistralForCausalLM", 8, ["sliding_attention", "full_attention", "sliding_attention"]),
    ({"global_layers": 1, "rope_scaling": YARN | {"beta_fast": 8.0, "mscale": 1.0,
                                                  "mscale_all_dim": 0.5, "truncate": False}},
     "MistralForCausalLM", None, None),
    ({"global_layers": (0, 1, 2), "rope_local_base": 5000.0}, "MistralForCausalLM", None, None),
    ({"global_layers": (2,), "rope_local_base": 5000.0},  # the local base is the global one
     "MinistralForCausalLM", 8, ["sliding_attention", "sliding_attention", "full_attention"]),
    ({"global_layers": 3, "rope_scaling": YARN | {"attention_factor": 0.9, "factor": 4.0}},
     "MinistralForCausalLM", 8, ["sliding_attention", "sliding_attention", "full_attention"]),
])
def test_export_as_transformers_reads_it(tmp_path, overrides, architecture, window,
                                         layer_types):
    config = _ours(**overrides)
    hf = hf_config(config, max_position_embeddings=64, end_of_document_id=1, pad_id=0)
    assert hf["architectures"] == [architecture]
    assert hf["sliding_window"] == window and hf.get("layer_types") == layer_types
    assert hf["head_dim"] == config.resolved_head_dim and "rope_parameters" not in hf
    assert hf["tie_word_embeddings"] is config.tie_embeddings
    assert hf["rope_theta"] == 5000.0 and hf["torch_dtype"] == "float32"
    scaling = overrides.get("rope_scaling")
    if scaling is None:
        assert hf["rope_scaling"] is None and hf["max_position_embeddings"] == 64
    else:  # the 4.x form, which both 4.x (`type`) and 5.x (`rope_type`) read
        assert hf["rope_scaling"]["type"] == hf["rope_scaling"]["rope_type"] == \
            scaling["rope_type"]
        assert {k: hf["rope_scaling"][k] for k in scaling} == scaling
        assert hf["max_position_embeddings"] == (  # yarn: the extended context, not 64
            scaling["factor"] * scaling["original_max_position_embeddings"]
            if scaling["rope_type"] == "yarn" else 64)

    (tmp_path / "config.json").write_text(json.dumps(hf))
    read = transformers.AutoConfig.from_pretrained(str(tmp_path))
    assert type(read).__name__ == architecture.replace("ForCausalLM", "Config")
    assert read.sliding_window == window and read.head_dim == config.resolved_head_dim
    assert read.tie_word_embeddings is config.tie_embeddings
    assert read.num_key_value_heads == 2 and read.rms_norm_eps == 1e-5
    if layer_types is not None:
        assert read.layer_types == layer_types
    assert {k: v for k, v in read.rope_parameters.items() if k != "type"} == \
        {"rope_theta": 5000.0, "rope_type": "default"} | (
            {k: v for k, v in hf["rope_scaling"].items() if k != "type"} if scaling else {})
    # transformers' rotary embedding of what it read: our frequencies and attention factor.
    rotary = MistralRotaryEmbedding(read)
    inverse, factor = rope_frequencies(config.resolved_head_dim, 5000.0, config.rope_scaling)
    np.testing.assert_allclose(rotary.inv_freq.numpy(), inverse, rtol=1e-6)
    assert rotary.attention_scaling == pytest.approx(factor, rel=1e-12)
    # And back: the 5.x layout transformers writes imports as the config exported.
    fields = model_fields(read.to_dict())
    imported = TransformerConfig.from_config(fields)
    assert imported.global_layer_indices == config.global_layer_indices
    assert imported.rope_scaling == config.rope_scaling
    if config.global_layer_indices != (0, 1, 2):
        assert imported.window_size == config.window_size
    assert imported.tie_embeddings == config.tie_embeddings
    assert imported.resolved_head_dim == config.resolved_head_dim
