"""Packing: shifted targets, document isolation, padding, too-small corpora."""

import numpy as np
import pytest

from data import PackedExamples
from data.packing import check_documents_per_row

END, PAD = 9, 8


def test_examples_cover_the_stream_with_shifted_targets_and_padding():
    tokens = np.arange(1, 24) % 7  # 23 tokens, no end-of-document
    examples = PackedExamples(tokens, seq_len=5, end_of_document_id=END, pad_id=PAD,
                              isolate_documents=False)
    assert len(examples) == 5  # 22 predictions / 5, rounded up
    inputs = np.concatenate([examples[i]["inputs"] for i in range(5)])
    targets = np.concatenate([examples[i]["targets"] for i in range(5)])
    mask = np.concatenate([examples[i]["loss_mask"] for i in range(5)])
    assert mask.sum() == tokens.size - 1
    np.testing.assert_array_equal(inputs[mask > 0], tokens[:-1])
    np.testing.assert_array_equal(targets[mask > 0], tokens[1:])
    np.testing.assert_array_equal(targets[mask == 0], PAD)
    assert "segment_ids" not in examples[0]


def test_document_isolation_segments_and_positions():
    tokens = np.array([1, 2, END, 3, 4, 5, END, 6, END, 7, 1, 2, 3])
    examples = PackedExamples(tokens, seq_len=8, end_of_document_id=END, pad_id=PAD,
                              isolate_documents=True)
    first, second = examples[0], examples[1]
    np.testing.assert_array_equal(first["inputs"], [1, 2, END, 3, 4, 5, END, 6])
    np.testing.assert_array_equal(first["segment_ids"], [1, 1, 1, 2, 2, 2, 2, 3])
    np.testing.assert_array_equal(first["positions"], [0, 1, 2, 0, 1, 2, 3, 0])
    # Example 1 starts where example 0's targets end: at the END closing document 3.
    np.testing.assert_array_equal(second["inputs"], [END, 7, 1, 2, 3, PAD, PAD, PAD])
    np.testing.assert_array_equal(second["targets"], [7, 1, 2, 3, PAD, PAD, PAD, PAD])
    np.testing.assert_array_equal(second["segment_ids"], [1, 2, 2, 2, 0, 0, 0, 0])
    np.testing.assert_array_equal(second["positions"], [0, 0, 1, 2, 3, 4, 5, 6])
    np.testing.assert_array_equal(second["loss_mask"], [1, 1, 1, 1, 0, 0, 0, 0])


def test_documents_that_begin_with_a_bos_start_there_and_never_predict_it():
    """A pretrained model's BOS (Gemma's): each document's segment and positions start at its
    BOS, as in transformers' forward over one document, and no target is the BOS."""
    bos = 5
    tokens = np.array([bos, 1, 2, END, bos, 3, END, bos, 4])
    example = PackedExamples(tokens, seq_len=8, end_of_document_id=END, pad_id=PAD,
                             isolate_documents=True, begin_of_document_id=bos)[0]
    np.testing.assert_array_equal(example["targets"], [1, 2, END, bos, 3, END, bos, 4])
    np.testing.assert_array_equal(example["loss_mask"], [1, 1, 1, 0, 1, 1, 0, 1])
    np.testing.assert_array_equal(example["segment_ids"], [1, 1, 1, 1, 2, 2, 2, 3])
    np.testing.assert_array_equal(example["positions"], [0, 1, 2, 3, 0, 1, 2, 0])


def test_corpus_smaller_than_one_example_and_bad_seq_len():
    with pytest.raises(ValueError, match="fewer than one example of seq_len \\+ 1 = 11"):
        PackedExamples(np.arange(10), 10, END, PAD, True)
    with pytest.raises(ValueError, match="seq_len=0: expected a positive int"):
        PackedExamples(np.arange(10), 0, END, PAD, True)


def test_a_row_with_more_documents_than_cudnn_has_room_for_is_a_one_line_error():
    """(Which backends bound the documents: tests/model/test_config.py.)"""
    batch = {"segment_ids": np.array([[1, 1, 2, 3, 3, 0], [1, 1, 1, 1, 1, 1]], np.int32)}
    check_documents_per_row(batch, 4)  # 4 runs (padding is one) fit
    with pytest.raises(ValueError, match=r"a batch row holds 4 documents, more than "
                                         r"model.max_documents_per_row=3 .*: raise it"):
        check_documents_per_row(batch, 3)
    check_documents_per_row({"inputs": batch["segment_ids"]}, 1)  # stream packing
