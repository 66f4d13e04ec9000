"""Tokenized splits cached on disk as memory-mapped arrays, so that a restart does not
tokenize again.

A split is one flat token array: each document's ids followed by the end-of-document id.
The cache key hashes the source's identity (which files, their sizes and times, or which
dataset), the split and the tokenizer; the metadata beside the array records its length and a
checksum, and an array that does not match (stale, truncated, corrupt) is rebuilt.

Several processes (of one multi-process run, or runs side by side) may ask for the same split
at once: the first builds it under a file lock while the others wait and then read its array;
files are written under names unique to their writer and renamed into place, so a reader
never sees a half-written one, even where the lock is not available (some network file
systems).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import uuid
import zlib

import numpy as np

from data import sources
from data.tokenizers import Tokenizer
from errors import UserError
from folders import writable_folder_problem

_FORMAT = 2


def tokenized_split(config, split: str, tokenizer: Tokenizer, cache_dir: str) -> np.ndarray:
    """All tokens of ``split`` as a read-only memory-mapped array (uint16 where ids fit)."""
    identity = sources.source_identity(config, split) | {"tokenizer": tokenizer.name,
                                                         "format": _FORMAT}
    key = hashlib.sha1(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:20]
    base = os.path.join(cache_dir, f"{config.source}-{split}-{key}")
    tokens = _load(base)
    if tokens is None:
        _check_writable(cache_dir)
        with _exclusive(base + ".lock"):
            tokens = _load(base)  # another process may have built it while we waited
            if tokens is None:
                _build(base, config, split, tokenizer)
                tokens = _load(base)
    if tokens.size == 0:
        if split == "validation" and config.source in ("stdlib", "text") \
                and not config.validation_paths:
            raise UserError(f"data.source={config.source!r}: the validation split is empty "
                            f"(data.validation_fraction={config.validation_fraction} of the "
                            f"corpus held out): raise data.validation_fraction"
                            + (" or set data.validation_paths" if config.source == "text"
                                else ""))
        raise UserError(f"data.source={config.source!r} split {split!r} has no text "
                        f"(empty corpus)")
    return tokens


def _check_writable(cache_dir: str) -> None:
    """A one-line `UserError` naming ``data.cache_dir`` where it cannot be created or written."""
    problem = writable_folder_problem(cache_dir)
    if problem:
        raise UserError(f"data.cache_dir={cache_dir!r}: cannot write the token cache there "
                        f"({problem}); set data.cache_dir to a writable folder")


@contextlib.contextmanager
def _exclusive(lock_path: str):
    """Holds an exclusive lock on ``lock_path`` (released when the process ends, however it
    ends); without one where the file system has no locks."""
    with open(lock_path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError:  # e.g. ENOLCK: the unique names below still keep the files whole
            pass
        yield


def _checksum(tokens: np.ndarray) -> int:
    """CRC-32 of the array's bytes: catches corruption at ~2 GB/s (a restart's main cost)."""
    return zlib.crc32(memoryview(np.ascontiguousarray(tokens)).cast("B"))


def _load(base: str) -> np.ndarray | None:
    """The cached array, or None where it is missing or does not match its metadata."""
    try:
        with open(base + ".json") as f:
            meta = json.load(f)
        if os.path.getsize(base + ".tokens") != meta["num_tokens"] * np.dtype(meta["dtype"]).itemsize:
            raise ValueError("size mismatch")
        if meta["num_tokens"] == 0:
            return np.zeros((0,), meta["dtype"])
        tokens = np.memmap(base + ".tokens", dtype=meta["dtype"], mode="r")
        if _checksum(tokens) != meta["checksum"]:
            raise ValueError("checksum mismatch")
        return tokens
    except (FileNotFoundError, NotADirectoryError):  # none yet, or data.cache_dir is a file
        return None
    except (OSError, ValueError, KeyError, TypeError) as error:
        logging.warning("token cache %s is unusable (%s); rebuilding it", base, error)
        return None


def _build(base: str, config, split: str, tokenizer: Tokenizer) -> None:
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32
    os.makedirs(os.path.dirname(base), exist_ok=True)
    end = np.array([tokenizer.end_of_document_id], dtype)
    checksum, count, documents = 0, 0, 0
    unique = f"tmp-{uuid.uuid4().hex}"  # never another writer's file, on any host
    temporary = f"{base}.tokens.{unique}"
    try:
        with open(temporary, "wb") as out:
            for document in sources.read_documents(config, split):
                ids = np.concatenate([tokenizer.encode(document).astype(dtype), end])
                raw = ids.tobytes()
                out.write(raw)
                checksum = zlib.crc32(raw, checksum)
                count += ids.size
                documents += 1
    except BaseException:
        os.remove(temporary)  # a bad source or an interruption leaves nothing behind
        raise
    # Array first, metadata last: a crash in between leaves no metadata, so no stale match.
    os.replace(temporary, base + ".tokens")
    meta = {"num_tokens": count, "dtype": np.dtype(dtype).name, "checksum": checksum,
            "documents": documents}
    with open(f"{base}.json.{unique}", "w") as f:
        json.dump(meta, f)
    os.replace(f"{base}.json.{unique}", base + ".json")
