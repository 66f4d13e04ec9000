"""Where a new run's parameters come from: ``config.init_from``.

``init_from`` names a workdir (the parameters of its latest checkpoint, or ``PATH@STEP``) or a
Hugging Face model folder (config.json and safetensors of a family of `hf.families`:
Mistral, Gemma, Qwen, OLMo 3, Phi-3). The new run takes only the parameters: a fresh
optimizer, step 0, its own data. Once it has a checkpoint of its own it resumes from that, as
every run does.

Two steps, at two places:

1. `adopt_source_config` (train.py's command line, before the run): the source's
   architecture (the ``model.*`` fields of `hf.config.IMPORTED_FIELDS`) and its tokenizer
   become the run's, except the fields given on the command line, which win; so the window,
   the RoPE fields, the global layers, ``seq_len``, dtype and mesh may differ from the
   source's.
2. `initial_params` (train.py's `_train`, where the run has no checkpoint): the parameters,
   laid out on the run's mesh. A Hugging Face folder is read tensor by tensor straight into
   the shards (`hf.params.load_params`); a workdir's checkpoint is restored by orbax into
   them. A shape that the run's model does not have is a one-line error naming the parameter
   and both shapes.
"""

from __future__ import annotations

import os
from collections.abc import Collection

import jax
import ml_collections

import run_config
from checkpoints import Checkpoints
from data import make_tokenizer, tokenizer_source
from data.tokenizers import Tokenizer
from errors import UserError
from hf.config import IMPORTED_FIELDS, model_fields, read_config_json
from hf.params import load_params
from model import TransformerLM
from steps import TrainSetup, create_train_state

# The data fields that decide the vocabulary: the source's tokenizer comes with its model.
TOKENIZER_FIELDS = ("tokenizer", "sentencepiece_model", "sentencepiece_vocab_size",
                    "hf_tokenizer")


def split_step(init_from: str) -> tuple[str, int | None]:
    """``"PATH@STEP"`` -> ``(PATH, STEP)``; ``"PATH"`` -> ``(PATH, None)``."""
    path, at, step = init_from.rpartition("@")
    if not at:
        return init_from, None
    if not step.isdigit():
        raise UserError(f"init_from={init_from!r}: expected PATH or PATH@STEP with STEP a "
                        f"checkpoint step")
    return path, int(step)


def is_hf_folder(path: str) -> bool:
    """Whether ``path`` is a Hugging Face model folder (it has config.json) rather than a
    workdir."""
    return os.path.isfile(os.path.join(path, "config.json"))


def _source_fields(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """``{"model": {...}, "data": {...}}``: the architecture and tokenizer fields that the
    run takes from its source: its own checkpoint's config once it has one, else
    ``init_from``'s."""
    if _has_checkpoints(workdir):
        own = Checkpoints(workdir, read_only=True)
        try:
            if own.latest_step() is not None:
                return _workdir_fields(own, None, workdir)
        finally:
            own.close()
    path, step = split_step(config.init_from)
    if is_hf_folder(path):
        if step is not None:
            raise UserError(f"init_from={config.init_from!r}: a Hugging Face folder has no "
                            f"steps; drop @{step}")
        fields = model_fields(read_config_json(path), os.path.join(path, "config.json"))
        return {"model": {name: fields[name] for name in IMPORTED_FIELDS},
                "data": {"tokenizer": "hf", "hf_tokenizer": os.path.abspath(path)}}
    if not _has_checkpoints(path):
        raise UserError(f"init_from={config.init_from!r}: neither a workdir with checkpoints "
                        f"nor a Hugging Face model folder with config.json")
    source = Checkpoints(path, read_only=True)
    try:
        return _workdir_fields(source, step, path)
    finally:
        source.close()


def _has_checkpoints(workdir: str) -> bool:
    return os.path.isdir(os.path.join(workdir, "checkpoints"))


def _workdir_fields(checkpoints: Checkpoints, step: int | None, workdir: str) -> dict:
    _, saved = checkpoints.restore_config(step)
    model = {name: saved.model[name] for name in IMPORTED_FIELDS if name in saved.model}
    data = {name: saved.data[name] for name in TOKENIZER_FIELDS if name in saved.data}
    if data.get("tokenizer") == "sentencepiece" and not data.get("sentencepiece_model"):
        # The model that run trained for itself, not a new one trained here.
        data["sentencepiece_model"] = os.path.abspath(os.path.join(workdir, "sentencepiece.model"))
    return {"model": model, "data": data}


def adopt_source_config(config: ml_collections.ConfigDict, workdir: str,
                        explicit: Collection[str] = ()) -> None:
    """Sets ``config``'s architecture and tokenizer fields (in place) to those of the source
    (`_source_fields`), except those in ``explicit`` (dotted names given on the command line,
    e.g. ``"model.window_size"``; a group's name keeps all its fields). Nothing without
    ``config.init_from``. Raises a one-line `UserError` for a source that is not there."""
    if not config.init_from:
        return
    for part, fields in _source_fields(config, workdir).items():
        for name, value in fields.items():
            _set(config[part], f"{part}.{name}", name, value, explicit)


def _set(group, dotted: str, name: str, value, explicit: Collection[str]) -> None:
    if any(dotted == given or dotted.startswith(given + ".") for given in explicit):
        return
    if isinstance(value, (dict, ml_collections.ConfigDict)):
        for key, inner in dict(value).items():
            _set(group[name], f"{dotted}.{key}", key, inner, explicit)
        return
    group[name] = tuple(value) if isinstance(value, list) else value


def initial_params(config: ml_collections.ConfigDict, training: TrainSetup, tokenizer: Tokenizer):
    """The parameters of ``config.init_from`` laid out as ``training.abstract_state.params``.
    ``tokenizer``: the new run's, which must be the one a workdir source trained with.
    Raises a one-line `UserError` naming a parameter whose shape differs, or both tokenizers."""
    path, step = split_step(config.init_from)
    target = training.abstract_state.params
    if is_hf_folder(path):
        return load_params(path, training.model.config, target)
    checkpoints = Checkpoints(path, read_only=True)
    try:
        step, saved = checkpoints.restore_config(step)
        checkpoints.check_tokenizer(tokenizer, tokenizer_source(config.data, path), step)
        source_model = run_config.model_config(saved, make_tokenizer(saved.data, path, trained=True))
        # The source's parameters, restored by orbax straight into the shards of this run's
        # mesh (the optimizer state is left on disk).
        abstract, _ = create_train_state(config, TransformerLM(source_model), training.mesh,
                                         training.optimizer, abstract=True)
        params = checkpoints.restore_params(abstract, step)
    finally:
        checkpoints.close()
    return _fit(params, target, f"{path}@{step}")


def _fit(params, target, source: str):
    """``params`` on ``target``'s shardings, or a one-line `UserError` naming the first
    parameter whose name or shape differs."""
    def describe(tree):
        return {jax.tree_util.keystr(path): leaf.shape
                for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}

    have, need = describe(params), describe(target)
    for name in sorted(set(have) | set(need)):
        if have.get(name) != need.get(name):
            raise UserError(f"init_from={source}: parameter {name} has shape "
                            f"{have.get(name, 'none')} there; this run's model needs "
                            f"{need.get(name, 'none')}")
    return jax.tree.map(lambda x, t: jax.device_put(x, t.sharding), params, target)
