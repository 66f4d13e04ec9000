"""run_config.py: which fields may change when a run resumes or is loaded for inference, and
the one-line errors that name the field. (End to end through train.py: tests/test_train.py.)"""

import pytest

import run_config
from configs import tiny


def test_resume_names_the_first_field_that_differs():
    saved = tiny.get_config()
    config = tiny.get_config()
    run_config.check_resume_compatible(saved, config, "DIR")
    config.model.d_model = 64
    with pytest.raises(ValueError, match=r"^model.d_model=64, but the checkpoints in DIR were "
                                         r"trained with 32: use another workdir"):
        run_config.check_resume_compatible(saved, config, "DIR")
    config = tiny.get_config()
    config.data.passkey_questions = 3
    with pytest.raises(ValueError, match=r"^data.passkey_questions=3, but"):
        run_config.check_resume_compatible(saved, config, "DIR")
    config = tiny.get_config()
    config.data.passkey_answer_weight = 16.0  # the same rows, weighted otherwise
    with pytest.raises(ValueError, match=r"^data.passkey_answer_weight=16.0, but"):
        run_config.check_resume_compatible(saved, config, "DIR")
    # Held-out files leave the training split with more text: other examples, other order.
    config = tiny.get_config()
    config.data.validation_paths = "held_out.txt"
    with pytest.raises(ValueError, match=r"^data.validation_paths='held_out.txt', but"):
        run_config.check_resume_compatible(saved, config, "DIR")


def test_kernel_fields_may_change_and_missing_fields_mean_their_defaults():
    saved, config = tiny.get_config(), tiny.get_config()
    config.model.attention_implementation = "dense"
    config.model.layer_chunk_size = 32
    config.num_train_steps = 100  # a longer run from the same checkpoints
    run_config.check_resume_compatible(saved, config, "DIR")
    # A checkpoint written before a field existed: it meant the field's default.
    for name in ("rope_base", "tie_embeddings"):
        del saved.model[name]
    del saved.data["passkey_questions"], saved.data["passkey_answer_weight"]
    run_config.check_resume_compatible(saved, tiny.get_config(), "DIR")
    config = tiny.get_config()
    config.model.rope_base = 500_000.0
    with pytest.raises(ValueError, match=r"^model.rope_base=500000.0, but .* with 10000.0"):
        run_config.check_resume_compatible(saved, config, "DIR")


def test_inference_overrides_may_not_touch_what_the_parameters_depend_on():
    run_config.check_inference_overrides({"data.source": "text", "mesh.context": 2})
    with pytest.raises(ValueError, match=r"^--config.model.window_size: the checkpoint's "
                                         r"parameters depend on it"):
        run_config.check_inference_overrides({"model.window_size": 8})
    with pytest.raises(ValueError, match=r"^--config.data.tokenizer: "):
        run_config.check_inference_overrides({"data.tokenizer": "bytes"})
    config = tiny.get_config()
    run_config.apply_overrides(config, {"data.source": "text", "batch_size": 2})
    assert config.data.source == "text" and config.batch_size == 2


def _float_fields(config, prefix=""):
    """The dotted names of ``config``'s float fields (placeholders of float too), at any depth."""
    import ml_collections

    for name in config.keys():
        value = config[name]
        if isinstance(value, ml_collections.ConfigDict):
            yield from _float_fields(value, f"{prefix}{name}.")
        elif config.get_ref(name).get_type() is float:
            yield f"{prefix}{name}"


def test_nan_and_inf_in_every_float_field_are_one_line_errors_naming_it():
    fields = list(_float_fields(tiny.get_config()))
    # the training, model, rope and data floats are all there
    assert {"learning_rate", "model.rope_base", "model.rope_scaling.factor",
            "data.validation_fraction"} <= set(fields), fields
    for field in fields:
        for value in (float("nan"), float("inf"), float("-inf")):
            config = tiny.get_config()
            run_config.apply_overrides(config, {field: value})
            with pytest.raises(run_config.UserError, match=rf"^{field}={value}: expected a "
                                                           rf"finite number$"):
                run_config.validate_config(config)
            with pytest.raises(run_config.UserError, match=rf"^--config.{field}={value}: "):
                run_config.check_inference_overrides({field: value})


@pytest.mark.parametrize("field, value, message", [
    ("data.validation_fraction", 1.0, r"^data.validation_fraction=1.0: expected a number in "
                                      r"\[0, 1\)"),
    ("data.document_separator", "<|end|>\n", r"^data.document_separator='<\|end\|>\\n': "
                                             r"expected one line's text"),
    ("data.document_separator", "page\x0c", r"^data.document_separator='page\\x0c': "
                                            r"expected one line's text"),
    ("data.workers", -1, r"^data.workers=-1: expected 0 \(one process per core\) or a "
                         r"number of processes >= 1"),
    ("min_learning_rate_ratio", 5.0, r"^min_learning_rate_ratio=5.0: expected a number in "
                                     r"\[0, 1\]"),
    ("model.num_heads", 3, r"^model.d_model=32 is not divisible by model.num_heads=3"),
])
def test_bad_fields_are_one_line_before_any_work(field, value, message):
    """Checked by validate_config, before the tokenizer (which may train for minutes)."""
    config = tiny.get_config()
    run_config.apply_overrides(config, {field: value})
    with pytest.raises(run_config.UserError, match=message):
        run_config.validate_config(config)
