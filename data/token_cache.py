"""Tokenized splits cached on disk as memory-mapped arrays, so that a restart does not
tokenize again.

A split is one flat token array: each document's ids followed by the end-of-document id.
The cache key hashes the source's identity (which files, their sizes and times, or which
dataset), the split and the tokenizer; the metadata beside the array records its length and a
checksum, and an array that does not match (stale, truncated, corrupt) is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib

import numpy as np

from data import sources
from data.tokenizers import Tokenizer

_FORMAT = 2


def tokenized_split(config, split: str, tokenizer: Tokenizer, cache_dir: str) -> np.ndarray:
    """All tokens of ``split`` as a read-only memory-mapped array (uint16 where ids fit)."""
    identity = sources.source_identity(config, split) | {"tokenizer": tokenizer.name,
                                                         "format": _FORMAT}
    key = hashlib.sha1(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:20]
    base = os.path.join(cache_dir, f"{config.source}-{split}-{key}")
    tokens = _load(base)
    if tokens is None:
        _build(base, config, split, tokenizer)
        tokens = _load(base)
    if tokens.size == 0:
        raise ValueError(f"data.source={config.source!r} split {split!r} has no text "
                         f"(empty corpus)")
    return tokens


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
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as error:
        logging.warning("token cache %s is unusable (%s); rebuilding it", base, error)
        return None


def _build(base: str, config, split: str, tokenizer: Tokenizer) -> None:
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32
    os.makedirs(os.path.dirname(base), exist_ok=True)
    end = np.array([tokenizer.end_of_document_id], dtype)
    checksum, count, documents = 0, 0, 0
    temporary = f"{base}.tokens.tmp{os.getpid()}"
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
    with open(base + ".json.tmp", "w") as f:
        json.dump(meta, f)
    os.replace(base + ".json.tmp", base + ".json")
