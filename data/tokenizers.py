"""Tokenizers: UTF-8 bytes (the default) and SentencePiece.

Both map text to int32 ids and back and reserve an end-of-document id (between packed
documents) and a padding id (never predicted; the loss mask drops it). Neither has a
beginning-of-document id: the models trained here never see one. A pretrained model's
tokenizer may (hf/tokenizer.py: Gemma's and Llama's BOS); `encode_document` puts it where that
model saw it in training, at the start of every document.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Iterable
from typing import Protocol

import numpy as np

from errors import UserError, first_line


class Tokenizer(Protocol):
    vocab_size: int  # model vocabulary: every id is below it
    end_of_document_id: int
    begin_of_document_id: int | None  # a BOS that starts every document, or None
    pad_id: int
    name: str  # identifies the tokenizer in cache keys

    def encode(self, text: str) -> np.ndarray: ...  # int32 (n,)

    def decode(self, ids: Iterable[int]) -> str: ...

    def byte_lengths(self) -> np.ndarray: ...  # int32 (vocab_size,): UTF-8 bytes of each id


def encode_document(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """int32 (n,): ``text``'s ids as a document (or a prompt) begins in training: after the
    tokenizer's ``begin_of_document_id`` where it has one (transformers' tokenizer adds it
    as its post-processor's template says, e.g. Gemma's ``<bos>``), else ``encode(text)``."""
    ids = tokenizer.encode(text)
    if tokenizer.begin_of_document_id is None:
        return ids
    return np.concatenate([np.array([tokenizer.begin_of_document_id], np.int32), ids])


def padded_vocab_size(num_ids: int) -> int:
    """``num_ids`` rounded up to a multiple of 128, so that the embedding and logits matmuls
    tile well (ids beyond ``num_ids`` are never produced)."""
    return -(-num_ids // 128) * 128


class ByteTokenizer:
    """UTF-8 bytes 0..255, then end-of-document (256) and padding (257); the vocabulary is
    padded to a multiple of 128 (384) so that the embedding and logits matmuls tile well."""

    end_of_document_id = 256
    begin_of_document_id = None
    pad_id = 257
    vocab_size = padded_vocab_size(258)
    name = "bytes"

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def byte_lengths(self) -> np.ndarray:
        """How many bytes of text each id stands for (for bits per byte): 1 for the bytes,
        0 for the end of document and padding."""
        return (np.arange(self.vocab_size) < 256).astype(np.int32)


class SentencePieceTokenizer:
    """A SentencePiece model; its ``eos`` is the end of document, ``pad`` the padding."""

    def __init__(self, model_path: str):
        import sentencepiece

        try:
            with open(model_path, "rb") as f:
                proto = f.read()
            self._processor = sentencepiece.SentencePieceProcessor(model_proto=proto)
        except (OSError, RuntimeError) as error:
            raise UserError(f"data.sentencepiece_model={model_path!r}: cannot load a "
                            f"SentencePiece model ({error})") from None
        self.model_path = model_path
        self.end_of_document_id = self._processor.eos_id()
        # Documents start without a BOS, as trained here, even where the model has one
        # (data.tokenizer="hf" keeps a pretrained model's).
        self.begin_of_document_id = None
        self.pad_id = self._processor.pad_id()
        self.vocab_size = padded_vocab_size(self._processor.get_piece_size())
        self.name = "sentencepiece-" + hashlib.sha1(proto).hexdigest()[:12]
        # Bits per byte divide by the bytes the ids stand for: a model that drops newlines or
        # whitespace (SentencePiece's defaults; ours before they were lossless) undercounts.
        self.lossless = self.decode(self.encode(_ROUND_TRIP_TEXT)) == _ROUND_TRIP_TEXT
        if not self.lossless:
            logging.warning("%s is lossy: decode(encode(text)) != text (it normalises text or "
                            "drops newlines or spaces), so bits per byte count only the bytes "
                            "it keeps; a model trained here by train.py is lossless (delete "
                            "a workdir's old model to retrain it)", model_path)

    @property
    def processor(self):
        """The ``sentencepiece.SentencePieceProcessor`` (its pieces, scores and
        ``serialized_model_proto()``, for hf/tokenizer.py's export)."""
        return self._processor

    def encode(self, text: str) -> np.ndarray:
        # int32 straight from SentencePiece's buffer: about 30% less time than its list of ints
        return self._processor.encode(text, out_type="numpy")

    def decode(self, ids: Iterable[int]) -> str:
        pieces = self._processor.get_piece_size()
        return self._processor.decode([int(i) for i in ids if 0 <= i < pieces
                                       and i not in (self.pad_id, self.end_of_document_id)])

    def byte_lengths(self) -> np.ndarray:
        """How many bytes of text each id stands for (for bits per byte): a byte-fallback
        piece is one byte, a word piece its UTF-8 length with "▁" as a space, control and
        unknown ids 0."""
        processor = self._processor
        lengths = np.zeros(self.vocab_size, np.int32)
        for i in range(processor.get_piece_size()):
            if processor.is_byte(i):
                lengths[i] = 1
            elif not (processor.is_control(i) or processor.is_unknown(i)):
                lengths[i] = len(processor.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
        return lengths


_MAX_SENTENCE = 1 << 14  # characters of one training line
# Newlines, indentation, a run of spaces, a tab, a leading space and a compatibility character
# (NFKC would change it): what a lossless tokenizer returns unchanged.
_ROUND_TRIP_TEXT = " def f(x):\n\tif x:\n        return  x  # ﬁ\n\n"


def train_sentencepiece(documents: Iterable[str], model_path: str, vocab_size: int,
                        max_characters: int = 20_000_000) -> None:
    """Trains a SentencePiece (unigram) model on ``documents`` and writes it to ``model_path``.

    As Flax's lm1b example does: on the training split, on first use, with at most
    ``max_characters`` of text. ids: pad 0, end of document 1, unknown 2 (no bos).

    Lossless: ``decode(encode(text)) == text`` for any text, so bits per byte count every byte
    of it. SentencePiece's defaults would normalise the text (NFKC), collapse runs of
    whitespace and drop newlines, which loses the indentation and lines of code and makes
    the model predict, and the bits per byte count, only what is left. Newlines stay in the
    training text (pieces of text of whole lines) and runs of spaces may be pieces, so code's
    indentation costs few tokens; characters never seen fall back to their bytes.
    """
    import sentencepiece

    def limited():
        # Runs of whole lines, each under SentencePiece's maximum length (it skips longer
        # ones, which would drop every book-length document).
        seen = 0
        for document in documents:
            piece = []
            length = 0
            for line in document.splitlines(keepends=True):
                line = line[:_MAX_SENTENCE]
                if length + len(line) > _MAX_SENTENCE:
                    yield "".join(piece)
                    piece, length = [], 0
                piece.append(line)
                length += len(line)
                seen += len(line)
                if seen >= max_characters:
                    break
            if piece:
                yield "".join(piece)
            if seen >= max_characters:
                return

    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=limited(), model_writer=model, vocab_size=vocab_size,
            model_type="unigram", character_coverage=1.0, byte_fallback=True,
            pad_id=0, eos_id=1, unk_id=2, bos_id=-1, max_sentence_length=_MAX_SENTENCE,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, allow_whitespace_only_pieces=True,
            split_by_whitespace=True, hard_vocab_limit=False, minloglevel=2,
            num_threads=os.cpu_count() or 1)
    except RuntimeError as error:  # e.g. a vocabulary smaller than the 256 byte pieces + chars
        reason = first_line(error).split("] ")[-1]  # after SentencePiece's "[file(line)] "
        raise UserError(f"data.sentencepiece_vocab_size={vocab_size}: SentencePiece training "
                        f"failed ({reason})") from None
    os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
    temporary = model_path + ".tmp"
    with open(temporary, "wb") as f:
        f.write(model.getvalue())
    os.replace(temporary, model_path)  # never leave a half-written model behind
