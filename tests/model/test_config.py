"""`TransformerConfig` (model/config.py): one-line errors for bad or missing values."""

import pytest

from model.config import TransformerConfig
from tests.model.inputs import small_config


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
])
def test_bad_config_values_raise_one_line_errors(field, value, message):
    with pytest.raises(ValueError) as error:
        small_config(**{field: value})
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_missing_vocab_size_and_unsupported_combinations():
    with pytest.raises(ValueError, match="model.vocab_size is missing"):
        TransformerConfig.from_config(dict(num_layers=2))
    with pytest.raises(ValueError, match="supports neither relative positions"):
        small_config(attention_implementation="dense", position_embedding="relative")


def test_the_document_bound_holds_only_where_cudnn_packed_layout_runs():
    # The bound is checked only where cuDNN's packed layout runs.
    model = TransformerConfig(vocab_size=8, dtype="bfloat16", max_documents_per_row=3)
    assert model.document_bound("gpu") == 3
    assert model.document_bound("cpu") == model.document_bound("tpu") == 0
    assert TransformerConfig(vocab_size=8, max_documents_per_row=3).document_bound("gpu") == 0
