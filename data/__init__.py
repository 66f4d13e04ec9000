"""Text to training batches: sources, tokenizers, the token cache, packing and iterators."""

from data.packing import PackedExamples
from data.pipeline import (TrainBatches, make_tokenizer, packed_examples, tokenizer_source,
                           validation_batches)
from data.tokenizers import ByteTokenizer, SentencePieceTokenizer

__all__ = ["ByteTokenizer", "PackedExamples", "SentencePieceTokenizer", "TrainBatches",
           "make_tokenizer", "packed_examples", "tokenizer_source", "validation_batches"]
