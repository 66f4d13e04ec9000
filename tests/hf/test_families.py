"""Each family of hf/families.py against transformers' own model (float32, eager): tiny random
models made by transformers, every weight shaped away from its initial value (norm weights
around 0 for Gemma's (1 + w), biases and q/k norms non-zero), on a sequence 4x the window.
Import gives transformers' logits; export writes back the same tensors and a config.json
that transformers reads as the same model."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from data.tokenizers import ByteTokenizer  # noqa: E402
from hf.config import model_fields, read_config_json  # noqa: E402
from hf.folder import write_model_folder  # noqa: E402
from hf.params import export_tensors  # noqa: E402
from tests.hf.test_params import _abstract, _relative_error  # noqa: E402
from hf.params import load_params  # noqa: E402
from model import TransformerConfig, TransformerLM  # noqa: E402

WINDOW = 8  # transformers' sliding_window
SEQ_LEN = 4 * WINDOW
_SHAPE = dict(vocab_size=258, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=WINDOW,
              max_position_embeddings=SEQ_LEN, rms_norm_eps=1e-5)
YARN = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16}

# Each family's tiny model (two layers, a local and a global one where the family has
# kinds): its config class, and what differs from the defaults.
FAMILIES = {
    # Layer 1 global (every 2nd); caps small enough that random weights reach them;
    # a query scale other than 1/sqrt(head_dim).
    "gemma2": (transformers.Gemma2Config, dict(query_pre_attn_scalar=24,
                                               attn_logit_softcapping=5.0,
                                               final_logit_softcapping=2.0)),
    # A local layer with its own base, linear scaling on the global one, tied.
    "gemma3_text": (transformers.Gemma3TextConfig, dict(
        query_pre_attn_scalar=24, final_logit_softcapping=None,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0,
                                            "rope_theta": 1000.0}})),
    # Layers from max_window_layers on slide; q/k/v biases.
    "qwen2": (transformers.Qwen2Config, dict(use_sliding_window=True, max_window_layers=1,
                                             tie_word_embeddings=True)),
    "qwen3": (transformers.Qwen3Config, dict(use_sliding_window=True, max_window_layers=1)),
    # 3 sliding to 1 full, YaRN on the full layer only, post-norms, q/k norms over all heads.
    "olmo3": (transformers.Olmo3Config, dict(num_hidden_layers=4, rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 500.0},
        "full_attention": YARN | {"rope_theta": 500.0}})),
    # The window on every layer; fused qkv and gate/up tensors.
    "phi3": (transformers.Phi3Config, dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)),
}


def _hf_model(model_type: str, **overrides):
    """A tiny transformers model of the family, float32, eager attention, every parameter
    moved off its initial value by noise."""
    config_class, values = FAMILIES[model_type]
    config = config_class(**(_SHAPE | values | overrides), attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return model


def _tokens():
    return np.random.RandomState(1).randint(0, _SHAPE["vocab_size"], (2, SEQ_LEN))


def _hf_logits(hf_model, tokens):
    with torch.no_grad():
        return hf_model(torch.tensor(tokens)).logits.numpy()


def _import(folder, **overrides):
    config = TransformerConfig.from_config(model_fields(read_config_json(folder)) | overrides)
    model = TransformerLM(config)
    return model, load_params(folder, config, _abstract(model))


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_import_and_export_agree_with_transformers(model_type, tmp_path):
    hf_model = _hf_model(model_type)
    source = str(tmp_path / "source")
    hf_model.save_pretrained(source, safe_serialization=True)
    model, params = _import(source)
    assert model.config.hf_model_type == model_type
    tokens = _tokens()
    expected = _hf_logits(hf_model, tokens)
    ours = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(tokens)))
    assert _relative_error(ours, expected) <= 1e-4

    exported = str(tmp_path / "exported")
    write_model_folder(exported, params, model.config, ByteTokenizer(), SEQ_LEN)
    written = safetensors.numpy.load_file(os.path.join(exported, "model.safetensors"))
    original = safetensors.numpy.load_file(os.path.join(source, "model.safetensors"))
    assert sorted(written) == sorted(original)
    for name, tensor in original.items():
        np.testing.assert_array_equal(written[name], tensor, err_msg=name)
    config = json.load(open(os.path.join(exported, "config.json")))
    assert config["model_type"] == model_type
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        exported, attn_implementation="eager").eval()
    np.testing.assert_array_equal(_hf_logits(reloaded, tokens), expected)
    reimported, _ = _import(exported)
    assert reimported.config == model.config


def test_the_language_model_of_a_multimodal_gemma_3(tmp_path):
    """A ``gemma3`` checkpoint (Gemma3ForConditionalGeneration, what the 4B and larger
    models ship as): its text_config and its language model's tensors (saved under
    ``language_model.``) give transformers' logits on text; the vision tower is left out,
    and the run exports as a text-only Gemma 3."""
    text = _hf_model("gemma3_text").config
    vision = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=1, num_attention_heads=2,
                                             image_size=28, patch_size=14)
    config = transformers.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                       mm_tokens_per_image=4, boi_token_index=255,
                                       eoi_token_index=256, image_token_index=257,
                                       attn_implementation="eager")
    torch.manual_seed(0)
    hf_model = transformers.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for parameter in hf_model.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    hf_model.save_pretrained(str(tmp_path), safe_serialization=True)
    model, params = _import(str(tmp_path))
    assert model.config.hf_model_type == "gemma3_text"
    tokens = _tokens() % 255  # text only: no image tokens
    ours = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(tokens)))
    assert _relative_error(ours, _hf_logits(hf_model, tokens)) <= 1e-4


def test_gemma2_loss_and_gradients_match_torch_autograd(tmp_path):
    """The chunked loss with the final soft-cap (chunks of 8 tokens) is transformers' loss of
    the capped logits, and its gradient is torch's, tensor by tensor (attention cap
    included)."""
    hf_model = _hf_model("gemma2")
    hf_model.save_pretrained(str(tmp_path), safe_serialization=True)
    model, params = _import(str(tmp_path), loss_chunk_size=8)
    tokens = _tokens()
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def loss(params):
        return model.apply({"params": params}, jnp.asarray(inputs),
                           targets=jnp.asarray(targets)).mean()

    ours, gradients = jax.jit(jax.value_and_grad(loss))(params)
    hf_loss = hf_model(torch.tensor(tokens), labels=torch.tensor(tokens)).loss
    hf_loss.backward()
    np.testing.assert_allclose(float(ours), float(hf_loss.detach()), rtol=1e-5)
    hf_gradients = {name: p.grad.numpy() for name, p in hf_model.named_parameters()}
    for name, gradient in export_tensors(gradients, model.config):
        expected = hf_gradients[name]
        assert _relative_error(gradient, expected) <= 1e-4, name


def test_qwen_without_use_sliding_window_has_no_window():
    """Qwen's released files carry a sliding_window with use_sliding_window false: no layer
    slides (the window applied anyway is a mistake other converters made)."""
    hf = _hf_model("qwen2", use_sliding_window=False).config.to_dict()
    assert hf["max_window_layers"] == 1 and hf.get("use_sliding_window") is False
    fields = model_fields(hf | {"sliding_window": 4096})
    assert fields["global_layers"] == 1 and fields["window_size"] == 0


@pytest.mark.parametrize("model_type,overrides,message", [
    ("gemma3_text", {"attn_logit_softcapping": 50.0},
     "attn_logit_softcapping=50.0; expected null"),
    ("gemma3_text", {"use_bidirectional_attention": True}, "use_bidirectional_attention=true"),
    ("gemma2", {"hidden_activation": "gelu"}, "hidden_activation='gelu'; expected "
                                              "'gelu_pytorch_tanh'"),
    ("cohere2", {}, "model_type='cohere2' is not supported yet: it has global layers without "
                    "RoPE"),
    ("olmo3", {"rope_parameters": {"sliding_attention": YARN | {"rope_theta": 1e4},
                                   "full_attention": {"rope_type": "default"}}},
     "rope scaling on sliding_attention layers"),
])
def test_what_a_family_cannot_bring_is_one_line(model_type, overrides, message):
    config_class = FAMILIES.get(model_type, FAMILIES["gemma2"])[0]
    hf = config_class(**_SHAPE).to_dict() | {"model_type": model_type} | overrides
    with pytest.raises(ValueError) as error:
        model_fields(hf)
    assert message in str(error.value) and "\n" not in str(error.value), str(error.value)
