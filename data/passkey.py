"""Pass keys: a random key planted in text and asked for later, the retrieval task of
`probes.passkey_accuracy` and, with ``data.passkey_fraction``, a training signal for it.

The format: ``the pass key is 48213. remember it. `` ... text ... ``what is the pass key? the
pass key is 48213``. A model answers only if it carries the key across the text between them,
so the task measures (and trains) attention over that distance.
"""

from __future__ import annotations

import numpy as np

PLANTED = "the pass key is {key}. remember it. "
QUESTION = " what is the pass key? the pass key is "
KEY_DIGITS = 5


def random_keys(rng: np.random.Generator, count: int) -> np.ndarray:
    """``count`` distinct random keys of `KEY_DIGITS` digits (no leading zero), int64."""
    low = 10**(KEY_DIGITS - 1)
    return rng.choice(10**KEY_DIGITS - low, count, replace=False) + low


def passkey_parts(tokenizer, key: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The token ids (int32) of the planted sentence, the question and the answer (the key's
    digits) for ``key``."""
    return (tokenizer.encode(PLANTED.format(key=key)), tokenizer.encode(QUESTION),
            tokenizer.encode(str(key)))


def check_passkey_fraction(fraction, packing: str) -> None:
    """One-line ValueErrors for a ``data.passkey_fraction`` that cannot be planted."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) \
            or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"data.passkey_fraction={fraction!r}: expected a number in [0, 1]")
    if fraction and packing != "stream":
        raise ValueError(f"data.passkey_fraction={fraction} needs data.packing='stream', not "
                         f"{packing!r}: a key and its question would often lie in different "
                         f"documents, which attention keeps apart")


class PasskeyRows:
    """Training examples with a pass key planted into a fraction of them (a grain data source).

    Example ``i`` of ``examples`` (a `data.packing.PackedExamples` with ``stream`` packing)
    gets, with probability ``fraction``, a random key: its planted sentence overwrites the
    text at a random position and, a random distance later, the question and the key's digits
    overwrite the text there, within the row's real (unpadded) tokens. Whether, which key,
    where and how far apart follow from ``(seed, i)`` alone, so a resumed run (which restores
    its position in the shuffled order) reads the same rows; each epoch plants the same keys.
    The loss covers the planted tokens like any others: the model learns to copy the key.
    """

    def __init__(self, examples, tokenizer, fraction: float, seed: int):
        check_passkey_fraction(fraction, "documents" if examples.isolate_documents else "stream")
        longest = sum(len(part) for part in passkey_parts(tokenizer, 10**KEY_DIGITS - 1))
        if examples.seq_len + 1 < longest:
            raise ValueError(f"data.passkey_fraction={fraction} with seq_len={examples.seq_len}: "
                             f"a planted key and its question take {longest} tokens; expected "
                             f"seq_len >= {longest - 1}")
        self.examples, self.tokenizer = examples, tokenizer
        self.fraction, self.seed = float(fraction), int(seed)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        example = self.examples[index]
        # A stream of its own per example: independent of the order examples are read in.
        rng = np.random.default_rng([self.seed, int(index), 0x9A55])
        if rng.random() >= self.fraction:
            return example
        planted, question, answer = passkey_parts(self.tokenizer, int(random_keys(rng, 1)[0]))
        # The row's tokens: inputs then the last target (the targets are inputs shifted by one).
        real = int(example["loss_mask"].sum())
        tokens = np.concatenate([example["inputs"], example["targets"][-1:]])
        room = real + 1 - len(planted) - len(question) - len(answer)
        if room < 0:  # the corpus's short last row
            return example
        distance = int(rng.integers(0, room + 1))
        start = int(rng.integers(0, room - distance + 1))
        ask = start + len(planted) + distance
        tokens[start:start + len(planted)] = planted
        tokens[ask:ask + len(question) + len(answer)] = np.concatenate([question, answer])
        return example | {"inputs": tokens[:-1], "targets": tokens[1:]}
