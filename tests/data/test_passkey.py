"""Pass keys planted into training rows (data.passkey_fraction)."""

import re

import ml_collections
import numpy as np
import pytest

from data import ByteTokenizer, PackedExamples, TrainBatches, make_tokenizer, packed_examples
from data.passkey import (PLANTED, QUESTION, PasskeyRows, key_distance, key_tokens,
                          passkey_parts, prompt_length)

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


def test_more_questions_ask_for_the_same_key_after_the_planted_sentence():
    rows = PasskeyRows(EXAMPLES, TOKENIZER, fraction=1.0, seed=0, questions=3)
    first_distances = []
    for index in range(len(EXAMPLES) - 1):  # the last row is short
        example, original = rows[index], EXAMPLES[index]
        text = _text(example)
        keys = re.findall(r"\d{5}", text)
        assert len(keys) == 4 and len(set(keys)) == 1  # planted once, answered three times
        planted_at = text.index(PLANTED.format(key=keys[0]))
        asked_at = [m.start() for m in re.finditer(re.escape(QUESTION + keys[0]), text)]
        assert len(asked_at) == 3 and planted_at < asked_at[0]
        first_distances.append(asked_at[0] - planted_at - len(PLANTED.format(key=keys[0])))
        # Everything outside the planted sentence and the questions is the packed row's.
        tokens = np.concatenate([example["inputs"], example["targets"][-1:]])
        kept = np.ones(len(tokens), bool)
        for start, length in [(planted_at, len(PLANTED.format(key=keys[0])))] + [
                (at, len(QUESTION) + 5) for at in asked_at]:
            kept[start:start + length] = False
        original_tokens = np.concatenate([original["inputs"], original["targets"][-1:]])
        np.testing.assert_array_equal(tokens[kept], original_tokens[kept])
    assert min(first_distances) < 10 and max(first_distances) > 60
    # One question: the rows of a single question per key (what runs before the field read).
    one = PasskeyRows(EXAMPLES, TOKENIZER, fraction=1.0, seed=0, questions=1)
    assert len(re.findall(r"\d{5}", _text(one[3]))) == 2


def test_the_answers_digits_carry_the_answer_weight_in_the_loss_mask():
    plain = PasskeyRows(EXAMPLES, TOKENIZER, fraction=1.0, seed=0, questions=3)
    weighted = PasskeyRows(EXAMPLES, TOKENIZER, fraction=1.0, seed=0, questions=3,
                           answer_weight=16.0)
    for index in range(len(EXAMPLES)):
        example, original = weighted[index], plain[index]
        for name in ("inputs", "targets"):  # the same rows; only the weights differ
            np.testing.assert_array_equal(example[name], original[name])
        # Bytes: a text index is a token index, and token t is the target at t - 1.
        text = _text(example)
        answers = [m.end() + digit for m in re.finditer(re.escape(QUESTION), text)
                   for digit in range(5)]
        expected = EXAMPLES[index]["loss_mask"].copy()
        expected[np.asarray(answers, int) - 1] = 16.0
        np.testing.assert_array_equal(example["loss_mask"], expected)
        assert len(answers) == (15 if index < len(EXAMPLES) - 1 else 0)  # the short last row


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
                            (dict(passkey_questions=0),  # checked even with no keys planted
                             "data.passkey_questions=0: expected an int >= 1"),
                            (dict(passkey_answer_weight=-1.0),
                             "data.passkey_answer_weight=-1.0: expected a finite number >= 0"),
                            (dict(passkey_answer_weight=float("nan")),
                             "data.passkey_answer_weight=nan: expected"),
                            (dict(passkey_fraction=0.5, packing="documents"),
                             "needs data.packing='stream'")):
        with pytest.raises(ValueError, match=re.escape(message)) as error:
            packed_examples(config(**fields), "train", TOKENIZER, 256)
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="seq_len >= ") as error:
        PasskeyRows(PackedExamples(TEXT, 40, 256, 257, False), TOKENIZER, 0.5, 0)
    assert "\n" not in str(error.value)
    for questions in (0, 1.5, True):
        with pytest.raises(ValueError, match=re.escape(
                f"data.passkey_questions={questions!r}: expected an int >= 1")):
            PasskeyRows(EXAMPLES, TOKENIZER, 0.5, 0, questions)
    with pytest.raises(ValueError, match="or fewer data.passkey_questions"):
        PasskeyRows(EXAMPLES, TOKENIZER, 0.5, 0, questions=6)


@pytest.mark.parametrize("kind", ["bytes", "sentencepiece"])
def test_the_planted_sentence_holds_the_answers_ids(kind, data_config, tmp_path):
    """The key in the planted sentence is the answer's ids (a SentencePiece tokenization of the
    whole sentence could merge digits with their neighbours), and key_distance counts from it."""
    tokenizer = TOKENIZER
    if kind == "sentencepiece":
        corpus = tmp_path / "corpus.txt"
        corpus.write_text("".join(PLANTED.format(key=10_000 + 7 * i) + "filler text. "
                                  + QUESTION + str(10_000 + 7 * i) + "\n" for i in range(300)))
        data_config.update(source="text", paths=str(corpus), validation_fraction=0.0,
                           tokenizer="sentencepiece", sentencepiece_vocab_size=300)
        tokenizer = make_tokenizer(data_config, str(tmp_path / "run"))
    before = tokenizer.encode(PLANTED.split("{key}")[0])
    for key in (48213, 10007, 99999):
        planted, question, answer = passkey_parts(tokenizer, key)
        assert tokenizer.decode(planted) == PLANTED.format(key=key)
        assert tokenizer.decode(question) == QUESTION and tokenizer.decode(answer) == str(key)
        np.testing.assert_array_equal(planted[len(before):len(before) + len(answer)], answer)
        after = len(planted) - len(before) - len(answer)
        assert key_distance(tokenizer, 7) == after + 7 + len(question)
    if kind == "bytes":
        assert key_distance(tokenizer, 0) == len(". remember it. ") + len(QUESTION)
        assert prompt_length(tokenizer, 7) == len(PLANTED.format(key=48213)) + 7 + len(QUESTION)


def test_key_tokens_counts_a_leading_piece_that_a_tokenizer_adds():
    class SpaceBeforeDigits(ByteTokenizer):  # as Llama's tokenizer adds "▁" before a number
        def encode(self, text):
            return super().encode(" " + text if text[:1].isdigit() else text)

    assert key_tokens(TOKENIZER) == 5
    assert key_tokens(SpaceBeforeDigits()) == 6
    planted, question, _ = passkey_parts(SpaceBeforeDigits(), 48213)
    assert prompt_length(SpaceBeforeDigits(), 7) == len(planted) + 7 + len(question)
