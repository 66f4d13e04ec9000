"""Text to training batches: sources, tokenizers, the token cache, packing and iterators.

The names below load on first use, so that a process that needs only part of the package
(the token cache's workers, data/shards.py) does not import JAX and grain (seconds)."""

import importlib

_MODULES = {"PackedExamples": "data.packing", "TrainBatches": "data.pipeline",
            "make_tokenizer": "data.pipeline", "packed_examples": "data.pipeline",
            "tokenizer_source": "data.pipeline", "validation_batches": "data.pipeline",
            "ByteTokenizer": "data.tokenizers", "SentencePieceTokenizer": "data.tokenizers"}

__all__ = sorted(_MODULES)


def __getattr__(name: str):
    if name not in _MODULES:
        raise AttributeError(f"module 'data' has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULES[name]), name)
