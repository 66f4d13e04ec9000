"""Pass keys: a random key planted in text and asked for later, the retrieval task of
`probes.passkey_accuracy` and, with ``data.passkey_fraction``, a training signal for it.

The format: ``the pass key is 48213. remember it. `` ... text ... ``what is the pass key? the
pass key is 48213``. A model answers only if it carries the key across the text between them,
so the task measures (and trains) attention over that distance.
"""

from __future__ import annotations

import numpy as np

from data.tokenizers import encode_document
from errors import UserError

PLANTED = "the pass key is {key}. remember it. "
QUESTION = " what is the pass key? the pass key is "
KEY_DIGITS = 5


def random_keys(rng: np.random.Generator, count: int) -> np.ndarray:
    """``count`` distinct random keys of `KEY_DIGITS` digits (no leading zero), int64."""
    low = 10**(KEY_DIGITS - 1)
    return rng.choice(10**KEY_DIGITS - low, count, replace=False) + low


def _fixed_ids(tokenizer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The token ids (int32) of the planted sentence's text before and after the key, and of
    the question: the parts that are the same for every key."""
    before, after = PLANTED.split("{key}")
    return tokenizer.encode(before), tokenizer.encode(after), tokenizer.encode(QUESTION)


def passkey_parts(tokenizer, key: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The token ids (int32) of the planted sentence, the question and the answer (the key's
    digits) for ``key``. The sentence holds the key as the answer's very ids (its text before
    and after the key tokenized apart), so copying it is exact with any tokenizer."""
    before, after, question = _fixed_ids(tokenizer)
    answer = tokenizer.encode(str(key))
    return np.concatenate([before, answer, after]).astype(np.int32), question, answer


def key_distance(tokenizer, distance: int) -> int:
    """Tokens from a planted key's last token to the end of the question that asks for it, with
    ``distance`` tokens of text between the planted sentence and the question: a stack of
    local layers that reaches fewer tokens back cannot see the key from any answer token."""
    _, after, question = _fixed_ids(tokenizer)
    return len(after) + distance + len(question)


def key_tokens(tokenizer) -> int:
    """The most tokens any key takes with ``tokenizer``: `KEY_DIGITS` with bytes, but a
    Llama-style tokenizer adds a piece for the leading space (every key encoded, once)."""
    keys = range(10**(KEY_DIGITS - 1), 10**KEY_DIGITS)
    return max(len(tokenizer.encode(str(key))) for key in keys)


def prompt_length(tokenizer, distance: int) -> int:
    """The most tokens that a planted sentence, ``distance`` tokens of text and the question
    take (the key's tokens: `key_tokens`), after the tokenizer's BOS where it has one."""
    before, _, _ = _fixed_ids(tokenizer)
    begin = encode_document(tokenizer, "")  # the BOS, or nothing
    return len(begin) + len(before) + key_tokens(tokenizer) + key_distance(tokenizer, distance)


def check_passkey_settings(fraction, questions, packing: str, answer_weight=1.0) -> None:
    """One-line `UserError`s for a ``data.passkey_fraction`` that cannot be planted, a
    ``data.passkey_questions`` that is not a count or a ``data.passkey_answer_weight`` that is
    not a finite weight."""
    if isinstance(questions, bool) or not isinstance(questions, int) or questions < 1:
        raise UserError(f"data.passkey_questions={questions!r}: expected an int >= 1")
    if isinstance(answer_weight, bool) or not isinstance(answer_weight, (int, float)) \
            or not 0.0 <= answer_weight < float("inf"):
        raise UserError(f"data.passkey_answer_weight={answer_weight!r}: expected a finite "
                        f"number >= 0")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) \
            or not 0.0 <= fraction <= 1.0:
        raise UserError(f"data.passkey_fraction={fraction!r}: expected a number in [0, 1]")
    if fraction and packing != "stream":
        raise UserError(f"data.passkey_fraction={fraction} needs data.packing='stream', not "
                        f"{packing!r}: a key and its question would often lie in different "
                        f"documents, which attention keeps apart")


class PasskeyRows:
    """Training examples with a pass key planted into a fraction of them (a grain data source).

    Example ``i`` of ``examples`` (a `data.packing.PackedExamples` with ``stream`` packing)
    gets, with probability ``fraction``, a random key: its planted sentence overwrites the
    text at a random position and, a random distance later, the question and the key's digits
    overwrite the text there, within the row's real (unpadded) tokens; ``questions`` > 1 asks
    again at random places after the first answer. Each answer is a copy that the loss
    rewards, and copying forms late in training (a plateau), so more questions per key teach
    retrieval in fewer steps. Whether, which key, where and how far apart follow from
    ``(seed, i)`` alone, so a resumed run (which restores its position in the shuffled order)
    reads the same rows; each epoch plants the same keys.

    The loss covers the planted tokens like any others: the model learns to copy the key. The
    answers' digits (the targets that copy the key) carry ``answer_weight`` in ``loss_mask``
    instead of 1: the loss is a weighted mean over the mask, and a weight of 16 makes a tiny
    model learn to copy in 2000 steps where weight 1 does not (bench/passkey.py).
    """

    def __init__(self, examples, tokenizer, fraction: float, seed: int, questions: int = 1,
                 answer_weight: float = 1.0):
        check_passkey_settings(fraction, questions,
                               "documents" if examples.isolate_documents else "stream",
                               answer_weight)
        # A key is at most KEY_DIGITS tokens (one per digit), whatever the tokenizer.
        before, after, question = _fixed_ids(tokenizer)
        longest = len(before) + len(after) + KEY_DIGITS + questions * (len(question) + KEY_DIGITS)
        if examples.seq_len + 1 < longest:
            raise UserError(f"data.passkey_fraction={fraction} with seq_len={examples.seq_len}: "
                            f"a planted key and {questions} question(s) take {longest} tokens; "
                            f"expected seq_len >= {longest - 1} or fewer "
                            f"data.passkey_questions")
        self.examples, self.tokenizer = examples, tokenizer
        self.fraction, self.seed, self.questions = float(fraction), int(seed), questions
        self.answer_weight = float(answer_weight)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        example = self.examples[index]
        # A stream of its own per example: independent of the order examples are read in.
        rng = np.random.default_rng([self.seed, int(index), 0x9A55])
        if rng.random() >= self.fraction:
            return example
        planted, question, answer = passkey_parts(self.tokenizer, int(random_keys(rng, 1)[0]))
        asked = np.concatenate([question, answer])
        # The row's tokens: inputs then the last target (the targets are inputs shifted by one).
        real = int(example["loss_mask"].sum())
        tokens = np.concatenate([example["inputs"], example["targets"][-1:]])
        room = real + 1 - len(planted) - self.questions * len(asked)
        if room < 0:  # the corpus's short last row
            return example
        # The first question at a uniform distance after the planted sentence (long distances as
        # often as short ones), the later ones at sorted random places in the text after it.
        distance = int(rng.integers(0, room + 1))
        start = int(rng.integers(0, room - distance + 1))
        later = np.sort(rng.integers(0, room - distance - start + 1, self.questions - 1))
        first = start + len(planted) + distance
        loss_mask = example["loss_mask"].copy()
        for ask in [first] + [first + int(gap) + i * len(asked) for i, gap in enumerate(later, 1)]:
            tokens[ask:ask + len(asked)] = asked
            # Token t is target t - 1: the answer's targets follow the question's last token.
            loss_mask[ask + len(question) - 1:ask + len(asked) - 1] = self.answer_weight
        tokens[start:start + len(planted)] = planted
        return example | {"inputs": tokens[:-1], "targets": tokens[1:], "loss_mask": loss_mask}
