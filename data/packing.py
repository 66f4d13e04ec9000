"""Packing a split's token stream into fixed-length examples.

Documents are already joined by end-of-document ids (see `data.token_cache`). Example ``i`` is
the window ``tokens[i * seq_len : i * seq_len + seq_len + 1]``: inputs are its first
``seq_len`` ids, targets the next ``seq_len``. Long documents therefore span many examples.
The last example is padded; its loss mask is 0 on padding. Where documents begin with a BOS
(`data.tokenizers.encode_document`), it is never a target: the loss mask is 0 there too, as a
model trained with one never predicts it (it is given at the start of every sequence).
"""

from __future__ import annotations

import numbers

import numpy as np

from errors import UserError


class PackedExamples:
    """Random-access examples over a token array (a grain data source).

    Each example is a dict of ``(seq_len,)`` arrays: ``inputs``, ``targets`` (int32),
    ``loss_mask`` (float32: 1 where the target is a real token, not padding or the
    ``begin_of_document_id``), and, with
    ``isolate_documents``, ``segment_ids`` (int32, from 1 per document within the example,
    0 on padding) and ``positions`` (int32, restarting at 0 after each end of document), so that
    attention never crosses a document.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, end_of_document_id: int, pad_id: int,
                 isolate_documents: bool, begin_of_document_id: int | None = None):
        if isinstance(seq_len, bool) or not isinstance(seq_len, numbers.Integral) or seq_len < 1:
            raise UserError(f"seq_len={seq_len!r}: expected a positive int")
        if tokens.size < seq_len + 1:
            raise UserError(f"the corpus has {tokens.size} tokens, fewer than one example of "
                            f"seq_len + 1 = {seq_len + 1}; use a smaller seq_len or more text")
        self.tokens = tokens
        self.seq_len = int(seq_len)
        self.end_of_document_id = end_of_document_id
        self.pad_id = pad_id
        self.begin_of_document_id = begin_of_document_id
        self.isolate_documents = isolate_documents

    def __len__(self) -> int:
        return -(-(self.tokens.size - 1) // self.seq_len)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(index)
        start = index * self.seq_len
        window = np.asarray(self.tokens[start:start + self.seq_len + 1], np.int32)
        real = window.size - 1  # predictable positions in this example
        window = np.pad(window, (0, self.seq_len + 1 - window.size), constant_values=self.pad_id)
        inputs, targets = window[:-1], window[1:]
        loss_mask = np.arange(self.seq_len) < real
        if self.begin_of_document_id is not None:
            loss_mask &= targets != self.begin_of_document_id
        example = {"inputs": inputs, "targets": targets, "loss_mask": loss_mask.astype(np.float32)}
        if self.isolate_documents:
            # A document's end-of-document token belongs to it; the next id starts a new one.
            ends_before = np.concatenate([[0], np.cumsum(inputs[:-1] == self.end_of_document_id)])
            segment_ids = np.where(np.arange(self.seq_len) < real, ends_before + 1, 0)
            starts = np.flatnonzero(np.diff(ends_before, prepend=0)) if real else []
            last_start = np.zeros(self.seq_len, np.int64)
            last_start[np.asarray(starts, np.int64)] = np.asarray(starts, np.int64)
            positions = np.arange(self.seq_len) - np.maximum.accumulate(last_start)
            example |= {"segment_ids": segment_ids.astype(np.int32),
                        "positions": positions.astype(np.int32)}
        return example


def documents_per_row(segment_ids: np.ndarray) -> np.ndarray:
    """``(..., seq_len)`` segment ids -> ``(...)`` the number of documents in each row: its
    runs of equal ids (padding counts as one)."""
    return 1 + (np.diff(segment_ids, axis=-1) != 0).sum(axis=-1)


def check_documents_per_row(batch: dict, bound: int) -> None:
    """A one-line error where a row of ``batch`` (numpy) holds more than ``bound`` documents
    (0: no bound), the room that cuDNN's packed layout was compiled with."""
    if bound and "segment_ids" in batch:
        most = int(documents_per_row(batch["segment_ids"]).max())
        if most > bound:
            raise UserError(f"a batch row holds {most} documents, more than "
                            f"model.max_documents_per_row={bound} (cuDNN's packed layout has "
                            f"that many slots): raise it (it may change on resume)")
