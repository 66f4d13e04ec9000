"""`TransformerConfig` (model/config.py): one-line errors for bad or missing values."""

import jax
import numpy as np
import pytest

from model import TransformerLM
from model.config import TransformerConfig
from model.rope import NO_SCALING, RopeScaling
from tests.model.inputs import init_params, random_tokens, small_config


@pytest.mark.parametrize("field,value,message", [
    ("num_heads", 0, "model.num_heads=0: expected a positive int"),
    ("d_model", 30, "model.d_model=30 is not divisible by model.num_heads=4"),
    ("activation", "relu", "model.activation='relu': expected one of"),
    ("window_size", -1, "model.window_size=-1"),
    ("layer_chunk_size", -8, "model.layer_chunk_size=-8: expected an int >= 0"),
    ("loss_chunk_size", 1.5, "model.loss_chunk_size=1.5: expected an int >= 0"),
    ("unknown_field", 1, "model.unknown_field: unknown model config field"),
    ("head_dim", 0, "model.head_dim=0: expected a positive int or None"),
    ("dropout_rate", "0.1", "model.dropout_rate='0.1': expected a number"),
    ("attention_implementation", "flash", "model.attention_implementation='flash'"),
    ("rope_base", 1.0, "model.rope_base=1.0"),
    ("num_kv_heads", 3, "model.num_kv_heads=3: expected None or a positive divisor"),
    ("global_layers", 5, "model.global_layers=5: expected an int k in 0..2"),
    ("global_layers", (0, 0), "model.global_layers=(0, 0): expected an int k"),
    ("global_layers", (2,), "model.global_layers=(2,): expected an int k"),
    ("norm_eps", 0, "model.norm_eps=0: expected a number > 0"),
    ("norm_eps", "1e-5", "model.norm_eps='1e-5': expected a number"),
    ("rope_local_base", 1.0, "model.rope_local_base=1.0: expected a number > 1"),
    ("rope_local_base", True, "model.rope_local_base=True: expected a number > 1"),
    ("scale_embeddings", "yes", "model.scale_embeddings='yes': expected a bool"),
    ("qkv_bias", 1, "model.qkv_bias=1: expected a bool"),
    ("block_norms", "both", "model.block_norms='both': expected one of ['pre', 'sandwich', "
                            "'post']"),
    ("qk_norm", "per_head", "model.qk_norm='per_head': expected one of"),
    ("norm", "gemma", "model.norm='gemma': expected one of"),
    ("attention_scale", 0.0, "model.attention_scale=0.0: expected a positive number or None"),
    ("attention_logit_soft_cap", -5.0, "model.attention_logit_soft_cap=-5.0: expected a "
                                       "positive number"),
    ("final_logit_soft_cap", "30", "model.final_logit_soft_cap='30': expected a positive "
                                   "number"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 2.0},
     "model.rope_scaling.rope_type='yarn' needs model.rope_scaling."
     "original_max_position_embeddings"),
    ("rope_scaling", {"bogus": 1}, "model.rope_scaling.bogus: unknown field"),
    ("rope_scaling", {"rope_type": "linear", "factor": 0.5},
     "model.rope_scaling.factor=0.5: expected a number >= 1"),
])
def test_bad_config_values_raise_one_line_errors(field, value, message):
    with pytest.raises(ValueError) as error:
        small_config(**{field: value})
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_missing_vocab_size_and_unsupported_combinations():
    with pytest.raises(ValueError, match="model.vocab_size is missing"):
        TransformerConfig.from_config(dict(num_layers=2))
    with pytest.raises(ValueError, match=r"model.attention_implementation='cudnn' cannot "
                                         r"soft-cap attention logits"):
        small_config(attention_implementation="cudnn", dtype="bfloat16",
                     attention_logit_soft_cap=50.0)
    with pytest.raises(ValueError, match="supports neither relative positions"):
        small_config(attention_implementation="dense", position_embedding="relative")


def test_the_document_bound_holds_only_where_cudnn_packed_layout_runs():
    # The bound is checked only where cuDNN's packed layout runs.
    model = TransformerConfig(vocab_size=8, dtype="bfloat16", max_documents_per_row=3)
    assert model.document_bound("gpu") == 3
    assert model.document_bound("cpu") == model.document_bound("tpu") == 0
    assert TransformerConfig(vocab_size=8, max_documents_per_row=3).document_bound("gpu") == 0


LINEAR = {"rope_type": "linear", "factor": 4.0}


def test_rope_of_global_and_local_layers():
    scaling = RopeScaling.from_dict(LINEAR)
    shared = small_config(rope_base=5e5, rope_scaling=LINEAR)
    assert shared.rope(True) == shared.rope(False) == (5e5, scaling)
    own = small_config(rope_base=5e5, rope_scaling=LINEAR, rope_local_base=1e4)
    assert own.rope(True) == (5e5, scaling)
    assert own.rope(False) == (1e4, NO_SCALING)  # local layers with their own base: unscaled


def _logits(config, params, tokens):
    return np.asarray(jax.jit(lambda p, t: TransformerLM(config).apply({"params": p}, t))(
        params, tokens))


def test_the_local_rope_base_applies_to_local_layers_only():
    tokens = random_tokens(length=16)
    # All layers global: rope_local_base is unused.
    config = small_config(global_layers=1, rope_base=500.0, rope_scaling=LINEAR)
    params = init_params(config, tokens)
    np.testing.assert_array_equal(
        _logits(small_config(global_layers=1, rope_base=500.0, rope_scaling=LINEAR,
                             rope_local_base=20.0), params, tokens),
        _logits(config, params, tokens))
    # All layers local: rope_local_base replaces rope_base, unscaled.
    local = small_config(rope_base=500.0, rope_scaling=LINEAR, rope_local_base=20.0)
    expected = _logits(small_config(rope_base=20.0), params, tokens)
    np.testing.assert_array_equal(_logits(local, params, tokens), expected)
    # The frequencies matter: local layers that kept the scaling would fail the check above.
    unscaled = _logits(small_config(rope_base=20.0, rope_scaling=LINEAR), params, tokens)
    assert np.abs(unscaled - expected).max() > 1e-3


def test_each_field_is_declared_once_and_everything_follows_from_it():
    """A TransformerConfig field's default, role and meaning are its declaration: the training
    config's model group, the resume rules and the fields a source gives a run follow."""
    import dataclasses
    import os

    import run_config
    from configs import default
    from hf.config import IMPORTED_FIELDS
    from model.config import ROLES, config_dict, fields_with_role

    declared = {f.name: f for f in dataclasses.fields(TransformerConfig)}
    assert all(f.metadata["role"] in ROLES and f.metadata["doc"] for f in declared.values())
    group = config_dict()
    assert set(group) == set(declared) - {"vocab_size"}
    assert default.get_config().model.to_dict() == group.to_dict()
    # The config group's defaults are the dataclass's: the same model either way.
    assert TransformerConfig.from_config(group.to_dict(), vocab_size=384) == \
        TransformerConfig(vocab_size=384)
    assert set(fields_with_role("architecture")) | set(fields_with_role("training")) | set(
        fields_with_role("kernel")) == set(group)
    assert IMPORTED_FIELDS == fields_with_role("architecture")
    assert run_config._MODEL_FIELDS_FREE_ON_RESUME == fields_with_role("kernel")
    # Typed: a command-line override of a None default parses to its type.
    group.num_kv_heads, group.rope_local_base = 2, 5e5
    with pytest.raises(TypeError):
        group.head_dim = "wide"
    docs = open(os.path.join(os.path.dirname(__file__), "..", "..", "docs", "model.md")).read()
    assert [name for name in group if f"`{name}`" not in docs] == []
