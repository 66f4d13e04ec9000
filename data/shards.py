"""A split cut into ordered shards that processes tokenize on their own; the split's tokens are
the shards' in order, the same as one pass over `sources.read_documents`.

Local files (``stdlib``, ``text``) are planned ahead (`plan`): a shard is a list of file
parts, whole files or byte ranges of a large file cut at separator lines, which a worker
reads itself, so the parent reads nothing. Other sources (``hf``, ``tfds``, ``max_documents``,
and the text split whose validation text is the last document's tail) are read by the parent
in order and handed out as lists of documents (`documents_in_shards`).

A worker writes its shard as ``<index>.tokens`` (the ids, each document's as
`tokenizers.encode_document` gives them, followed by the end-of-document id) and
``<index>.json`` (``num_tokens``, ``checksum``, ``documents``,
``bytes``: characters of text, for the progress bar), each renamed into place when whole, so
a shard with its ``.json`` is finished, whatever happened to the process since.
"""

from __future__ import annotations

import json
import os
import uuid
import zlib
from collections.abc import Iterator

import numpy as np

from data import sources
from data.tokenizers import Tokenizer, encode_document

# Text per shard (bytes of files, or characters of documents): enough that a worker's start
# and a shard's files cost little beside its tokenizing, few enough that a split of a few
# hundred MB keeps every core busy. Tests make it small.
SHARD_BYTES = 32 << 20


def plan(config, split: str) -> dict | None:
    """The shards of ``split`` as parts of local files, or None where the parent must read
    the documents itself (`documents_in_shards`). A JSON-serialisable dict:

    ``separator`` (str), ``holdout`` (``[fraction, validation]``: a document is kept where
    ``in_validation(key, fraction) == validation``; None: all), ``parts`` (the file parts in
    order, each ``[path, relative, start, end, first_index]``: bytes [start, end) of the file,
    its first document numbered ``first_index`` in the keys; ``first_index`` is None where it
    is still to be counted by `count_documents`), and ``shards`` (each ``[first part, end
    part, bytes]``).

    Raises `UserError` for bad paths, as `sources.read_documents` does.
    """
    if config.max_documents or config.source not in ("stdlib", "text"):
        return None
    validation = split == "validation"
    separator = ""
    if config.source == "stdlib":
        files = sources.stdlib_files()
        holdout = [config.validation_fraction, validation]
    elif config.validation_paths:
        field = "validation_paths" if validation else "paths"
        files = sources.text_files(config[field], f"data.{field}")
        separator, holdout = config.document_separator, None
    else:
        files = sources.text_files(config.paths, "data.paths")
        separator, holdout = config.document_separator, [config.validation_fraction, validation]
        if config.validation_fraction and not sources.hash_holds_out_some(
                files, separator, config.validation_fraction):
            return None  # the last document's tail: known only once the last file is read
    parts = []
    for path, relative in files:
        if not separator and holdout and sources.in_validation(relative, holdout[0]) != validation:
            continue  # a whole file in the other split: never read
        size = sources.file_size(path)
        cuts = [0, *sources.separator_cuts(path, separator, SHARD_BYTES), size]
        parts += [[path, relative, start, end, 0 if start == 0 else None]
                  for start, end in zip(cuts[:-1], cuts[1:])]
    shards, first, size = [], 0, 0
    for index, (_, _, start, end, _) in enumerate(parts):
        size += end - start
        if size >= SHARD_BYTES or index == len(parts) - 1:
            shards.append([first, index + 1, size])
            first, size = index + 1, 0
    return {"separator": separator, "holdout": holdout, "parts": parts, "shards": shards}


def uncounted(planned: dict) -> list[int]:
    """Indices of ``planned``'s parts whose ``first_index`` is still to be counted."""
    return [i for i, part in enumerate(planned["parts"]) if part[4] is None]


def count_documents(part: list, separator: str) -> int:
    """The documents (non-empty) in a file part ``[path, relative, start, end, _]``."""
    path, relative, start, end, _ = part
    return sum(1 for _ in sources.keyed_documents(path, relative, separator, start, end))


def number_parts(planned: dict, counts: dict[int, int]) -> None:
    """Sets each uncounted part's ``first_index`` from ``counts`` (part index -> documents
    in the part before it, of the same file: a part is uncounted only after another)."""
    parts = planned["parts"]
    for i in uncounted(planned):
        parts[i][4] = parts[i - 1][4] + counts[i - 1]


def planned_documents(planned: dict, shard: int) -> Iterator[str]:
    """The documents of shard ``shard`` of ``planned``, read from its files."""
    first, end, _ = planned["shards"][shard]
    holdout = planned["holdout"]
    for path, relative, start, stop, first_index in planned["parts"][first:end]:
        for key, document in sources.keyed_documents(path, relative, planned["separator"],
                                                     start, stop, first_index):
            if holdout is None or sources.in_validation(key, holdout[0]) == holdout[1]:
                yield document


def documents_in_shards(documents: Iterator[str]) -> Iterator[list[str]]:
    """``documents`` cut into consecutive lists of at least `SHARD_BYTES` characters (the
    last one shorter)."""
    shard, size = [], 0
    for document in documents:
        shard.append(document)
        size += len(document)
        if size >= SHARD_BYTES:
            yield shard
            shard, size = [], 0
    if shard:
        yield shard


def tokenize_shard(tokenizer: Tokenizer, dtype: str, documents, planned: dict | None,
                   base: str) -> dict:
    """Tokenizes a shard into ``base + ".tokens"`` and ``base + ".json"`` and returns what the
    ``.json`` holds. ``documents``: the shard's documents (a list), or where ``planned`` is
    given, its shard index there (read here). ``dtype``: the ids' NumPy dtype name."""
    if planned is not None:
        documents = planned_documents(planned, documents)
    end = np.array([tokenizer.end_of_document_id], dtype)
    checksum = count = texts = size = 0
    unique = f"part-{uuid.uuid4().hex}"  # never another writer's file, on any host
    try:
        with open(f"{base}.tokens.{unique}", "wb") as out:
            for document in documents:
                ids = encode_document(tokenizer, document).astype(dtype)
                raw = np.concatenate([ids, end]).tobytes()
                out.write(raw)
                checksum = zlib.crc32(raw, checksum)
                count += len(raw) // end.itemsize
                texts += 1
                size += len(document)
    except BaseException:
        os.remove(f"{base}.tokens.{unique}")  # a bad source or an interruption leaves nothing
        raise
    meta = {"num_tokens": count, "checksum": checksum, "documents": texts, "bytes": size}
    os.replace(f"{base}.tokens.{unique}", base + ".tokens")  # tokens first: see the docstring
    with open(f"{base}.json.{unique}", "w") as f:
        json.dump(meta, f)
    os.replace(f"{base}.json.{unique}", base + ".json")
    return meta
