"""From a data config to batches: tokenizer, cached token splits, packed examples, iterators.

Training batches come from a ``grain`` pipeline (shuffled per epoch with the seed, repeated
forever, prefetched by background threads); its state is a small dict that the training loop
saves in each checkpoint, and restoring it yields exactly the batch that would have come next.
On several processes each one reads only its rows of the global batch: process ``p`` of ``P``
gets rows ``[p * B / P, (p + 1) * B / P)``, so the union is the one-host batch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import grain
import jax
import numpy as np

from data import sources
from data.packing import PackedExamples
from data.passkey import PasskeyRows, check_passkey_settings
from data.token_cache import tokenized_split
from data.tokenizers import ByteTokenizer, SentencePieceTokenizer, Tokenizer, train_sentencepiece
from errors import UserError

TOKENIZERS = ("bytes", "sentencepiece", "hf")
PACKING = ("documents", "stream")
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "local_attention_lm")


def make_tokenizer(config, workdir: str | None = None, trained: bool = False) -> Tokenizer:
    """``data.tokenizer``: ``bytes``, or ``sentencepiece`` loaded from
    ``data.sentencepiece_model`` or, where that is empty, from ``<workdir>/sentencepiece.model``,
    trained there on the training split on first use (``trained``: a run that has trained
    already, whose model missing is a one-line `UserError`), or ``hf``: the tokenizer of the
    Hugging Face model folder ``data.hf_tokenizer`` (hf/tokenizer.py)."""
    if config.tokenizer == "bytes":
        return ByteTokenizer()
    if config.tokenizer == "hf":
        if not config.hf_tokenizer:
            raise UserError("data.tokenizer='hf' needs data.hf_tokenizer (a Hugging Face model "
                            "folder with tokenizer.json or tokenizer.model)")
        from hf.tokenizer import HuggingFaceTokenizer  # the tokenizers library only when used

        return HuggingFaceTokenizer(config.hf_tokenizer)
    if config.tokenizer != "sentencepiece":
        raise UserError(f"data.tokenizer={config.tokenizer!r}: expected one of {list(TOKENIZERS)}")
    model_path = config.sentencepiece_model
    if not model_path:
        if workdir is None:
            raise UserError("data.tokenizer='sentencepiece' needs data.sentencepiece_model or "
                            "a workdir to train one in")
        model_path = os.path.join(workdir, "sentencepiece.model")
        # What the model was trained with is kept beside it, so that a run never silently
        # continues with a tokenizer other than the one its config asks for.
        settings = {"source": config.source, "paths": config.paths,
                    "hf_name": config.hf_name, "tfds_name": config.tfds_name,
                    "vocab_size": config.sentencepiece_vocab_size}
        settings_path = os.path.join(workdir, "sentencepiece.json")
        if trained and not os.path.exists(model_path):
            raise UserError(f"{model_path} is missing: the tokenizer this run trained with (put "
                            f"it back; the checkpoints' ids mean its pieces)")
        # In a multi-process run process 0 trains it into the (shared) workdir while the
        # others wait, so that every process loads the same model.
        if jax.process_index() == 0 and not os.path.exists(model_path):
            train_sentencepiece(sources.read_documents(config, "train"), model_path,
                                config.sentencepiece_vocab_size)
            with open(settings_path, "w") as f:
                json.dump(settings, f)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("sentencepiece model in the workdir")
        if os.path.exists(settings_path):
            with open(settings_path) as f:
                trained = json.load(f)
            changed = sorted(k for k in settings if trained.get(k) != settings[k])
            if changed:
                raise UserError(
                    f"{model_path} was trained with {changed[0]}={trained.get(changed[0])!r}, "
                    f"the config asks for {settings[changed[0]]!r}; use another workdir or "
                    f"delete the model to retrain it")
    elif not os.path.exists(model_path):
        raise UserError(f"data.sentencepiece_model={model_path!r} does not exist")
    return SentencePieceTokenizer(model_path)


def tokenizer_source(config, workdir: str | None = None) -> str:
    """Where `make_tokenizer` takes the tokenizer of ``config`` (the data config) from, for
    messages: e.g. ``"data.sentencepiece_model='p.model'"`` or ``"runs/x/sentencepiece.model"``."""
    if config.tokenizer == "hf":
        return f"data.hf_tokenizer={config.hf_tokenizer!r}"
    if config.tokenizer == "sentencepiece":
        if config.sentencepiece_model:
            return f"data.sentencepiece_model={config.sentencepiece_model!r}"
        return os.path.join(workdir or "", "sentencepiece.model")
    return f"data.tokenizer={config.tokenizer!r}"


def split_tokens(config, split: str, tokenizer: Tokenizer) -> np.ndarray:
    """The ``split`` ('train' or 'validation') as one stream of token ids (documents joined by
    the end-of-document id), from the token cache under ``data.cache_dir`` (default
    `DEFAULT_CACHE_DIR`), which the processes of a multi-process run build together; see
    `data.token_cache.tokenized_split`."""
    return tokenized_split(config, split, tokenizer, config.cache_dir or DEFAULT_CACHE_DIR,
                           jax.process_index(), jax.process_count())


def packed_examples(config, split: str, tokenizer: Tokenizer, seq_len: int,
                    seed: int = 0) -> PackedExamples | PasskeyRows:
    """The ``split`` ('train' or 'validation') packed into examples of ``seq_len`` tokens;
    with ``data.passkey_fraction`` the training split's rows get pass keys planted (from
    ``seed``, see `PasskeyRows`), their answers weighted ``data.passkey_answer_weight``."""
    if config.packing not in PACKING:
        raise UserError(f"data.packing={config.packing!r}: expected one of {list(PACKING)}")
    fraction = config.get("passkey_fraction", 0.0)  # configs saved before the field: none
    questions = config.get("passkey_questions", 1)
    answer_weight = config.get("passkey_answer_weight", 1.0)
    check_passkey_settings(fraction, questions, config.packing, answer_weight)
    examples = PackedExamples(split_tokens(config, split, tokenizer), seq_len,
                              tokenizer.end_of_document_id, tokenizer.pad_id,
                              isolate_documents=config.packing == "documents",
                              begin_of_document_id=tokenizer.begin_of_document_id)
    if split == "train" and fraction:
        return PasskeyRows(examples, tokenizer, fraction, seed, questions, answer_weight)
    return examples


class TrainBatches:
    """An endless, shuffled, checkpointable iterator of this process's part of each batch.

    ``next()`` gives a dict of ``(global_batch_size / process_count, seq_len)`` numpy arrays
    (see `PackedExamples`); the process defaults to JAX's (``jax.process_index()`` of
    ``jax.process_count()``). ``state()`` is a JSON-serialisable dict; ``TrainBatches(...,
    state=s)`` continues exactly after the batch at which ``s`` was taken.
    """

    def __init__(self, examples: PackedExamples, global_batch_size: int, seed: int,
                 process_index: int | None = None, process_count: int | None = None,
                 prefetch: int = 2, state: dict | None = None):
        if process_index is None or process_count is None:
            process_index, process_count = jax.process_index(), jax.process_count()
        if global_batch_size % process_count:
            raise UserError(f"batch_size={global_batch_size} is not divisible by the "
                            f"{process_count} processes")
        local = global_batch_size // process_count
        dataset = (grain.MapDataset.source(examples).shuffle(seed=seed).repeat()
                   .batch(local, drop_remainder=True)
                   .slice(slice(process_index, None, process_count)))
        read_options = grain.ReadOptions(num_threads=max(1, prefetch),
                                         prefetch_buffer_size=prefetch)
        self._iterator = iter(dataset.to_iter_dataset(read_options))
        if state is not None:
            self._iterator.set_state(state)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iterator)

    def state(self) -> dict:
        return dict(self._iterator.get_state())


def validation_batches(examples: PackedExamples, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Every example once, in order, ``batch_size`` at a time; the last batch is completed
    with rows whose loss mask is 0 (so sums over the mask count each token once)."""
    if batch_size < 1:
        raise UserError(f"batch_size={batch_size!r}: expected a positive int")
    for start in range(0, len(examples), batch_size):
        rows = [examples[i] for i in range(start, min(start + batch_size, len(examples)))]
        while len(rows) < batch_size:
            rows.append({k: np.zeros_like(v) for k, v in rows[0].items()})
        yield {k: np.stack([row[k] for row in rows]) for k in rows[0]}
