"""Pass keys planted into training rows (data.passkey_fraction)."""

import re

import ml_collections
import numpy as np
import pytest

from data import ByteTokenizer, PackedExamples, TrainBatches, packed_examples
from data.passkey import PLANTED, QUESTION, PasskeyRows

TOKENIZER = ByteTokenizer()
# Lowercase filler without digits, so that every digit in a row belongs to a planted key.
TEXT = TOKENIZER.encode("the quick brown fox jumps over the lazy dog; " * 400)
EXAMPLES = PackedExamples(TEXT, seq_len=256, end_of_document_id=TOKENIZER.end_of_document_id,
                          pad_id=TOKENIZER.pad_id, isolate_documents=False)


def _text(example) -> str:
    return TOKENIZER.decode(np.concatenate([example["inputs"], example["targets"][-1:]]))


def test_planted_rows_hold_a_key_asked_for_later_and_the_rest_is_unchanged():
    rows = PasskeyRows(EXAMPLES, TOKENIZER, fraction=0.5, seed=0)
    pattern = re.compile(re.escape(PLANTED.format(key="KEY")).replace("KEY", r"(\d{5})")
                         + ".*?" + re.escape(QUESTION) + r"(\d{5})", re.DOTALL)
    planted, distances = 0, []
    for index in range(len(EXAMPLES)):
        example, original = rows[index], EXAMPLES[index]
        np.testing.assert_array_equal(example["targets"][:-1], example["inputs"][1:])
        np.testing.assert_array_equal(example["loss_mask"], original["loss_mask"])
        text = _text(example)
        found = pattern.search(text)
        if found is None:  # not planted: the row as packed
            assert not re.search(r"\d", text)
            np.testing.assert_array_equal(example["inputs"], original["inputs"])
            continue
        planted += 1
        assert found.group(1) == found.group(2)  # the question is answered with the same key
        # Outside the planted sentence and the question with its answer, the text is the row's.
        changed = np.flatnonzero(np.concatenate([example["inputs"], example["targets"][-1:]])
                                 != np.concatenate([original["inputs"], original["targets"][-1:]]))
        assert changed.min() >= found.start() and changed.max() < found.end()
        distances.append(text.index(QUESTION) - found.start() - len(PLANTED.format(key=0)))
    assert 0.3 < planted / len(EXAMPLES) < 0.7
    assert min(distances) < 60 and max(distances) > 120  # random distances across the row


def test_planting_is_a_function_of_seed_and_index_so_a_resumed_run_reads_the_same_rows():
    rows = PasskeyRows(EXAMPLES, TOKENIZER, fraction=0.5, seed=1)
    again = PasskeyRows(EXAMPLES, TOKENIZER, fraction=0.5, seed=1)
    other = PasskeyRows(EXAMPLES, TOKENIZER, fraction=0.5, seed=2)
    for index in (5, 0, 5, 17):  # any order
        np.testing.assert_array_equal(rows[index]["inputs"], again[index]["inputs"])
    assert any(not np.array_equal(rows[i]["inputs"], other[i]["inputs"]) for i in range(10))
    batches = TrainBatches(rows, global_batch_size=4, seed=3, prefetch=1)
    for _ in range(3):
        next(batches)
    resumed = TrainBatches(PasskeyRows(EXAMPLES, TOKENIZER, fraction=0.5, seed=1),
                           global_batch_size=4, seed=3, prefetch=1, state=batches.state())
    for _ in range(3):
        np.testing.assert_array_equal(next(batches)["inputs"], next(resumed)["inputs"])


def test_fraction_zero_changes_nothing_and_bad_values_are_one_line_errors(tmp_path):
    def config(**fields):
        data = ml_collections.ConfigDict(dict(
            source="text", paths=str(tmp_path / "corpus.txt"), validation_paths="",
            document_separator="", validation_fraction=0.0, max_documents=0,
            tokenizer="bytes", packing="stream", cache_dir=str(tmp_path / "cache")))
        data.update(fields)
        return data

    (tmp_path / "corpus.txt").write_text(TOKENIZER.decode(TEXT))
    plain = packed_examples(config(passkey_fraction=0.0), "train", TOKENIZER, 256, seed=4)
    assert isinstance(plain, PackedExamples)
    np.testing.assert_array_equal(plain[3]["inputs"], EXAMPLES[3]["inputs"])
    planted = packed_examples(config(passkey_fraction=1.0), "train", TOKENIZER, 256, seed=4)
    assert "the pass key is" in _text(planted[3])
    for fields, message in ((dict(passkey_fraction=1.5), "data.passkey_fraction=1.5: expected"),
                            (dict(passkey_fraction=0.5, packing="documents"),
                             "needs data.packing='stream'")):
        with pytest.raises(ValueError, match=re.escape(message)) as error:
            packed_examples(config(**fields), "train", TOKENIZER, 256)
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="seq_len >= ") as error:
        PasskeyRows(PackedExamples(TEXT, 40, 256, 257, False), TOKENIZER, 0.5, 0)
    assert "\n" not in str(error.value)
