"""hf/params.py and hf/folder.py against transformers' own Mistral and Ministral: the same
logits both ways (float32, beyond the window), identical parameters after a round trip,
sharded files, and one-line errors for what does not fit."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from data.tokenizers import ByteTokenizer  # noqa: E402
from errors import UserError  # noqa: E402
from hf.config import model_fields, read_config_json  # noqa: E402
from hf.folder import write_model_folder  # noqa: E402
from hf.params import TensorFiles, load_params  # noqa: E402
from model import TransformerConfig, TransformerLM  # noqa: E402

WINDOW = 8  # transformers' sliding_window: our window_size + 1
SEQ_LEN = 4 * WINDOW


def _hf_model(kind="mistral", **overrides):
    """A tiny random transformers model (float32), grouped heads, window 8."""
    torch.manual_seed(0)
    values = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  sliding_window=WINDOW, rms_norm_eps=1e-5, tie_word_embeddings=False,
                  max_position_embeddings=SEQ_LEN) | overrides
    if kind == "ministral":
        values.setdefault("layer_types", ["sliding_attention", "full_attention",
                                          "sliding_attention"])
        config = transformers.MinistralConfig(**values)
        return transformers.MinistralForCausalLM(config).eval()
    return transformers.MistralForCausalLM(transformers.MistralConfig(**values)).eval()


def _abstract(model: TransformerLM):
    """The model's parameters as ShapeDtypeStructs on one device."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.PRNGKey(0),
                                                        jnp.zeros((1, 1), jnp.int32))["params"]))
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), shapes)


def _import(folder, **overrides):
    config = TransformerConfig.from_config(
        model_fields(read_config_json(folder)) | overrides)
    model = TransformerLM(config)
    return model, load_params(folder, config, _abstract(model))


def _tokens(vocab=256, length=SEQ_LEN):
    return np.random.RandomState(1).randint(0, vocab, (2, length))


def _hf_logits(hf_model, tokens):
    with torch.no_grad():
        return hf_model(torch.tensor(tokens)).logits.numpy()


def _relative_error(ours, theirs):
    return float(np.abs(np.asarray(ours) - theirs).max() / np.abs(theirs).max())


@pytest.mark.parametrize("kind,scan_layers", [("mistral", False), ("mistral", True),
                                              ("ministral", False)])
def test_import_gives_transformers_logits_beyond_the_window(tmp_path, kind, scan_layers):
    hf_model = _hf_model(kind, tie_word_embeddings=kind == "ministral")
    hf_model.save_pretrained(tmp_path)
    model, params = _import(str(tmp_path), scan_layers=scan_layers)
    assert model.config.window_size == WINDOW - 1
    assert model.config.global_layer_indices == ((1,) if kind == "ministral" else ())
    tokens = _tokens()
    ours = jax.jit(model.apply)({"params": params}, jnp.asarray(tokens))
    assert _relative_error(ours, _hf_logits(hf_model, tokens)) <= 1e-4


def test_a_bfloat16_checkpoint_loads_as_float32(tmp_path):
    hf_model = _hf_model()
    hf_model.to(torch.bfloat16).save_pretrained(tmp_path)
    _, params = _import(str(tmp_path))
    expected = hf_model.model.layers[1].mlp.down_proj.weight.detach().float().numpy().T
    np.testing.assert_array_equal(params["layer_1"]["mlp"]["down"]["kernel"], expected)
    assert params["layer_1"]["mlp"]["down"]["kernel"].dtype == jnp.float32


def test_a_window_off_by_one_changes_the_logits(tmp_path):
    """The test above can fail: the window convention shows beyond the window."""
    hf_model = _hf_model()
    hf_model.save_pretrained(tmp_path)
    model, params = _import(str(tmp_path), window_size=WINDOW)  # L = W, not W - 1
    tokens = _tokens()
    assert _relative_error(jax.jit(model.apply)({"params": params}, jnp.asarray(tokens)),
                           _hf_logits(hf_model, tokens)) > 1e-3


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
     "beta_fast": 8.0, "mscale": 1.0, "mscale_all_dim": 0.5, "truncate": False},
])
def test_rope_scaling_equals_transformers_past_the_original_length(tmp_path, scaling):
    """All layers global, so that every position reaches back to position 0 (64 > 16)."""
    hf_model = _hf_model(sliding_window=None, rope_scaling=scaling, rope_theta=500.0,
                         max_position_embeddings=4 * SEQ_LEN)
    hf_model.save_pretrained(tmp_path)
    model, params = _import(str(tmp_path))
    assert model.config.rope_scaling.rope_type == scaling["rope_type"]
    tokens = _tokens(length=2 * SEQ_LEN)
    ours = jax.jit(model.apply)({"params": params}, jnp.asarray(tokens))
    assert _relative_error(ours, _hf_logits(hf_model, tokens)) <= 1e-4
    unscaled, _ = _import(str(tmp_path), rope_scaling={})
    assert _relative_error(unscaled.apply({"params": params}, jnp.asarray(tokens)),
                           _hf_logits(hf_model, tokens)) > 1e-3


def _our_model(**overrides):
    values = dict(vocab_size=384, num_layers=3, d_model=48, num_heads=4, num_kv_heads=2,
                  head_dim=12, mlp_dim=80, window_size=WINDOW - 1) | overrides
    model = TransformerLM(TransformerConfig.from_config(values))
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(3),
                                          jnp.zeros((1, 1), jnp.int32))["params"])
    # Norm scales away from 1, so that a misplaced one shows.
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x * (1 + 0.3 * jax.random.uniform(jax.random.PRNGKey(len(str(path))),
                                                           x.shape))
        if "scale" in jax.tree_util.keystr(path) else x, params)
    return model, params


@pytest.mark.parametrize("overrides,architecture", [
    ({}, "MistralForCausalLM"),  # scaled, tied embeddings: the scale folded in
    ({"tie_embeddings": False, "global_layers": (1,)}, "MinistralForCausalLM"),
    ({"global_layers": 1, "rope_scaling": {"rope_type": "yarn", "factor": 2.0,
                                            "original_max_position_embeddings": 16}},
     "MistralForCausalLM"),
])
def test_export_loads_in_transformers_with_our_logits(tmp_path, overrides, architecture):
    model, params = _our_model(**overrides)
    folder = str(tmp_path / "hf")
    write_model_folder(folder, params, model.config, ByteTokenizer(), SEQ_LEN)
    assert json.load(open(os.path.join(folder, "config.json")))["architectures"] == [architecture]
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(hf_model).__name__ == architecture
    tokens = _tokens(vocab=258)
    ours = jax.jit(model.apply)({"params": params}, jnp.asarray(tokens))
    assert _relative_error(ours, _hf_logits(hf_model, tokens)) <= 1e-4


@pytest.mark.parametrize("scan_layers", [False, True])
def test_round_trip_gives_identical_parameters(tmp_path, scan_layers):
    model, params = _our_model(scale_embeddings=False, tie_embeddings=False,
                               scan_layers=scan_layers, global_layers=(2,))
    folder = str(tmp_path / "hf")
    # Small files: the sharded layout with its index.
    write_model_folder(folder, params, model.config, ByteTokenizer(), SEQ_LEN,
                       max_shard_bytes=40_000)
    assert os.path.exists(os.path.join(folder, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(folder) if f.endswith(".safetensors")]) > 2
    imported, loaded = _import(folder, scan_layers=scan_layers)
    assert imported.config == model.config
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_scaled_embeddings_round_trip_as_the_same_function(tmp_path):
    model, params = _our_model()  # scale_embeddings and tied: what export folds in
    folder = str(tmp_path / "hf")
    write_model_folder(folder, params, model.config, ByteTokenizer(), SEQ_LEN)
    imported, loaded = _import(folder)
    assert not imported.config.scale_embeddings
    tokens = jnp.asarray(_tokens(vocab=258))
    np.testing.assert_allclose(jax.jit(imported.apply)({"params": loaded}, tokens),
                               jax.jit(model.apply)({"params": params}, tokens),
                               rtol=1e-4, atol=1e-5)


def test_bad_folders_are_one_line_errors(tmp_path):
    hf_model = _hf_model()
    hf_model.save_pretrained(tmp_path / "ok")
    folder = str(tmp_path / "ok")
    with pytest.raises(ValueError, match=r"tensor model.layers.0.mlp.down_proj.weight has shape "
                                         r"\(64, 96\); this model needs \(64, 128\)"):
        _import(folder, mlp_dim=128)
    with pytest.raises(ValueError, match=r"is not a folder"):
        read_config_json(str(tmp_path / "missing"))
    config = json.load(open(os.path.join(folder, "config.json")))
    with pytest.raises(ValueError, match=r"model_type='gpt2'; expected one of"):
        model_fields(config | {"model_type": "gpt2"})
    with pytest.raises(ValueError, match=r"model_type='gpt_oss' is not supported yet: it has "
                                         r"attention sinks"):
        model_fields(config | {"model_type": "gpt_oss"})
    with pytest.raises(ValueError, match=r"hidden_act='gelu'"):
        model_fields(config | {"hidden_act": "gelu"})
    # A sharded folder whose index has a spare tensor, and one whose index lacks a tensor
    # (the index alone edited; a shard that lacks what its index names: the test below).
    model, params = _our_model(tie_embeddings=False)
    sharded = str(tmp_path / "sharded")
    write_model_folder(sharded, params, model.config, ByteTokenizer(), SEQ_LEN,
                       max_shard_bytes=40_000)
    index_path = os.path.join(sharded, "model.safetensors.index.json")
    index = json.load(open(index_path))
    index["weight_map"]["model.layers.0.self_attn.q_proj.bias"] = "model-00001-of-00002.safetensors"
    json.dump(index, open(index_path, "w"))
    with pytest.raises(ValueError, match=r"q_proj.bias has no place in this model"):
        _import(sharded)
    del index["weight_map"]["model.layers.0.self_attn.q_proj.bias"]
    del index["weight_map"]["model.norm.weight"]
    json.dump(index, open(index_path, "w"))
    with pytest.raises(ValueError, match=r"tensor model.norm.weight is missing"):
        _import(sharded)
    os.remove(os.path.join(folder, "model.safetensors"))
    with pytest.raises(ValueError, match=r"neither model.safetensors nor"):
        _import(folder)


def test_a_shard_lacking_a_tensor_its_index_names_is_one_line(tmp_path):
    """The index lists every tensor (so no name is missing or spare), but puts one in a real
    shard that does not hold it: the shape check, which reads each header before any tensor,
    and the read itself name the file and the tensor in one line, not safetensors' error."""
    model, params = _our_model(tie_embeddings=False)
    folder = str(tmp_path / "sharded")
    write_model_folder(folder, params, model.config, ByteTokenizer(), SEQ_LEN,
                       max_shard_bytes=40_000)
    index_path = os.path.join(folder, "model.safetensors.index.json")
    index = json.load(open(index_path))
    weight_map = index["weight_map"]
    holder = weight_map["model.norm.weight"]
    elsewhere = next(f for f in sorted(set(weight_map.values())) if f != holder)
    assert "model.norm.weight" not in safetensors.numpy.load_file(os.path.join(folder, elsewhere))
    weight_map["model.norm.weight"] = elsewhere
    json.dump(index, open(index_path, "w"))
    expected = (f"{os.path.join(folder, elsewhere)} lacks the tensor model.norm.weight that "
                f"model.safetensors.index.json places there")
    with pytest.raises(UserError) as raised:
        _import(folder)
    assert str(raised.value) == expected
    files = TensorFiles(folder)
    for access in (files.shape, files.read):
        with pytest.raises(UserError) as raised:
            access("model.norm.weight")
        assert str(raised.value) == expected
    assert files.shape("lm_head.weight") == (384, 48)  # the other tensors still read

@pytest.mark.parametrize("overrides,message", [
    ({"position_embedding": "relative"}, r"model.position_embedding='relative' cannot be "
                                         r"exported as MistralForCausalLM: its "
                                         r"position_embedding is 'rope'"),
    ({"activation": "gelu"}, r"model.activation='gelu' cannot be exported"),
    ({"hf_model_type": "gemma2", "activation": "swiglu"},
     r"model.activation='swiglu' cannot be exported as Gemma2ForCausalLM: its activation is "
     r"'geglu'"),
    ({"hf_model_type": "phi3", "global_layers": (1,), "scale_embeddings": False},
     r"model.global_layers=\(1,\) cannot be exported as Phi3ForCausalLM: it applies the window "
     r"to every layer"),
    ({"global_layers": (1,), "rope_local_base": 1000.0},
     r"model.rope_local_base=1000.0 cannot be exported"),
])
def test_what_transformers_cannot_represent_is_refused_before_writing(tmp_path, overrides,
                                                                      message):
    model, params = _our_model(**overrides)
    with pytest.raises(ValueError, match=message):
        write_model_folder(str(tmp_path / "hf"), params, model.config, ByteTokenizer(), SEQ_LEN)
    assert not os.listdir(tmp_path)
