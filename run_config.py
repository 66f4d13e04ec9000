"""What a run's config must satisfy, checked before any work: the training fields, and the
fields that must not change when a run resumes (or when a trained run is loaded for inference).

Model fields are checked by `model.TransformerConfig`, data fields where data/ uses them; the
command line (unknown fields, wrong types) by cli.py.
"""

from __future__ import annotations

import dataclasses
import json
import math

import ml_collections

from configs import data as data_config
from data import sources
from data.token_cache import worker_count
from data.tokenizers import Tokenizer
from errors import UserError
from model import TransformerConfig
from model.config import fields_with_role

# Fields that must not change when a run resumes, by what depends on them: the arrays of the
# checkpoint (their shapes and what they mean: the model and its vocabulary) ...
PARAMETER_FIELDS = ("model", "data.tokenizer", "data.sentencepiece_model",
                    "data.sentencepiece_vocab_size", "data.hf_tokenizer")
# ... and the data iterator's saved position (which examples, cut how, in which order, and
# what is planted in them): the fields that decide the training split's text
# (data.sources.source_identity; a data folder may move), how it is cut and what rows hold.
DATA_ORDER_FIELDS = ("seed", "seq_len", "batch_size", "data.source", "data.paths",
                     "data.validation_paths", "data.document_separator", "data.hf_name",
                     "data.hf_config", "data.hf_train_split", "data.hf_text_field",
                     "data.tfds_name", "data.tfds_train_split", "data.tfds_text_field",
                     "data.packing", "data.max_documents", "data.validation_fraction",
                     "data.passkey_fraction", "data.passkey_questions",
                     "data.passkey_answer_weight")
# model.* fields that change neither the parameters nor the data (how the same numbers are
# computed: model/config.py's "kernel" fields): free to change on resume.
_MODEL_FIELDS_FREE_ON_RESUME = fields_with_role("kernel")
_MODEL_DEFAULTS = {field.name: (dataclasses.asdict(field.default)
                                 if dataclasses.is_dataclass(field.default) else field.default)
                   for field in dataclasses.fields(TransformerConfig)
                   if field.default is not dataclasses.MISSING}
_DATA_DEFAULTS = data_config.get_config().to_dict()
DECAY_SCHEDULES = ("cosine", "linear")  # of the learning rate (steps.learning_rate_schedule)


def check_finite_floats(config: ml_collections.ConfigDict, prefix: str = "") -> None:
    """A one-line `UserError` naming the first float field of ``config``, at any depth, that
    is NaN or infinite: no field means anything by them, and a NaN learning rate would
    otherwise train a step before the non-finite loss stops the run."""
    for name, value in config.items():
        if isinstance(value, (ml_collections.ConfigDict, dict)):
            check_finite_floats(ml_collections.ConfigDict(value), f"{prefix}{name}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{prefix}{name}={value}: expected a finite number")


def validate_config(config: ml_collections.ConfigDict) -> None:
    """One-line `UserError`s for bad training fields and non-finite floats anywhere (model and
    data fields are checked where they are used: TransformerConfig.from_config, data/)."""
    check_finite_floats(config)
    def int_at_least(name, minimum):
        value = config[name] if "." not in name else config.data[name.split(".")[1]]
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise UserError(f"{name}={value!r}: expected an int >= {minimum}")

    for name in ("num_train_steps", "batch_size", "seq_len", "grad_accum_steps",
                 "checkpoint_every_steps", "log_every_steps", "keep_checkpoints"):
        int_at_least(name, 1)
    for name in ("warmup_steps", "eval_every_steps", "eval_batches", "sample_tokens",
                 "data.prefetch", "data.max_documents"):
        int_at_least(name, 0)
    for name in ("data.sentencepiece_vocab_size", "data.passkey_questions"):
        int_at_least(name, 1)
    for name in ("learning_rate", "weight_decay", "grad_clip_norm", "min_learning_rate_ratio",
                 "peak_flops_per_device"):
        if not isinstance(config[name], (int, float)) or config[name] < 0:
            raise UserError(f"{name}={config[name]!r}: expected a number >= 0")
    if isinstance(config.seed, bool) or not isinstance(config.seed, int) \
            or not 0 <= config.seed < 2**31:
        raise UserError(f"seed={config.seed!r}: expected an int in [0, 2**31)")
    rules = config.logical_axis_rules
    if not isinstance(rules, (tuple, list)) or not all(
            isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)
            for rule in rules):
        raise UserError(f"logical_axis_rules={rules!r}: expected (logical name, mesh axes) "
                        f"pairs, as configs/default.py lists them")
    if config.learning_rate == 0:
        raise UserError("learning_rate=0: expected a positive number")
    if config.decay_schedule not in DECAY_SCHEDULES:
        raise UserError(f"decay_schedule={config.decay_schedule!r}: expected one of "
                        f"{list(DECAY_SCHEDULES)}")
    if config.warmup_steps >= config.num_train_steps:
        raise UserError(f"warmup_steps={config.warmup_steps}: expected fewer than "
                        f"num_train_steps={config.num_train_steps}")
    for name in ("adam_b1", "adam_b2"):
        if not 0 <= config[name] < 1:
            raise UserError(f"{name}={config[name]!r}: expected a number in [0, 1)")
    if not config.min_learning_rate_ratio <= 1:
        raise UserError(f"min_learning_rate_ratio={config.min_learning_rate_ratio!r}: expected "
                        f"a number in [0, 1] (the decay ends at learning_rate times it)")
    if not 0 <= config.data.validation_fraction < 1:
        raise UserError(f"data.validation_fraction={config.data.validation_fraction!r}: "
                        f"expected a number in [0, 1) (the share of the text held out)")
    sources.check_separator(config.data.document_separator)
    worker_count(config.data)
    if config.sample_tokens + len(config.sample_prompt.encode()) >= 2**31:
        raise UserError(f"sample_tokens={config.sample_tokens}: expected fewer than "
                        f"{2**31 - len(config.sample_prompt.encode())} (positions are int32)")
    # The model's fields, before the tokenizer (which may train for minutes) gives the vocabulary.
    TransformerConfig.from_config(config.model.to_dict(), vocab_size=1)
    if config.batch_size % config.grad_accum_steps:
        raise UserError(f"batch_size={config.batch_size} is not divisible by "
                        f"grad_accum_steps={config.grad_accum_steps}")


def model_config(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> TransformerConfig:
    """The `TransformerConfig` of ``config.model``, with the tokenizer's vocabulary."""
    return TransformerConfig.from_config(config.model.to_dict(), vocab_size=tokenizer.vocab_size)


def check_resume_compatible(saved: ml_collections.ConfigDict,
                            config: ml_collections.ConfigDict, directory: str) -> None:
    """A one-line `UserError` naming the first field of `PARAMETER_FIELDS` or
    `DATA_ORDER_FIELDS` where ``config`` differs from ``saved`` (the config of the checkpoints
    in ``directory``). A field that the checkpoint's code did not have yet meant its default."""
    for field in PARAMETER_FIELDS + DATA_ORDER_FIELDS:
        part, _, name = field.partition(".")
        old = saved.get(part) if not name else saved.get(part, {}).get(
            name, _DATA_DEFAULTS.get(name) if part == "data" else None)
        new = config[part] if not name else config[part][name]
        old = old.to_dict() if isinstance(old, ml_collections.ConfigDict) else old
        new = new.to_dict() if isinstance(new, ml_collections.ConfigDict) else new
        if field == "model":
            old = _MODEL_DEFAULTS | (old or {})
            old, new = ({k: v for k, v in fields.items() if k not in _MODEL_FIELDS_FREE_ON_RESUME}
                        for fields in (old, new))
        old, new = json.loads(json.dumps(old)), json.loads(json.dumps(new))  # tuples as lists
        if old != new:
            if isinstance(old, dict):
                key = next(k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))
                field, old, new = f"{field}.{key}", old.get(key), new.get(key)
            raise UserError(f"{field}={new!r}, but the checkpoints in {directory} were trained "
                            f"with {old!r}: use another workdir, or the same value to resume")


def check_batch_size(config: ml_collections.ConfigDict) -> None:
    """A one-line `UserError` where ``batch_size`` is not a positive multiple of
    ``grad_accum_steps`` (checked apart from `validate_config` for a trained run's saved
    config, which may predate fields that validate_config reads)."""
    size, accumulation = config.batch_size, config.get("grad_accum_steps", 1)
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise UserError(f"batch_size={size!r}: expected an int >= 1")
    if size % accumulation:
        raise UserError(f"batch_size={size} is not divisible by "
                        f"grad_accum_steps={accumulation}")


def check_inference_overrides(overrides: dict) -> None:
    """A one-line `UserError` where flat ``{"data.source": ..., ...}`` overrides of a trained
    run's config touch one of `PARAMETER_FIELDS` (the parameters depend on it) or set a float
    to NaN or infinity."""
    for key, value in overrides.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--config.{key}={value}: expected a finite number")
    fixed = [key for key in overrides if key.startswith(PARAMETER_FIELDS)]
    if fixed:
        raise UserError(f"--config.{fixed[0]}: the checkpoint's parameters depend on it; it "
                        f"cannot change after training")


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict) -> None:
    """Sets flat ``{"data.source": ..., "batch_size": ...}`` overrides on ``config`` in place."""
    for key, value in overrides.items():
        parent, _, name = key.rpartition(".")
        target = config
        for part in filter(None, parent.split(".")):
            target = target[part]
        target[name] = value
