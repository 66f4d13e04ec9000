"""probes.py: the passkey probe's scoring of candidate answers, its greedy copies against
the model's full forward pass, and its bands."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from model import TransformerConfig, TransformerLM
from probes import (answer_log_likelihoods, copied_digits, distance_band, greedy_continuations,
                    passkey_bands)


def test_answers_of_different_lengths_score_as_each_alone():
    """A SentencePiece key is one to five pieces: the batched, padded scores equal each
    answer's log-likelihood computed on its own, unpadded row."""
    config = TransformerConfig.from_config(dict(vocab_size=64, num_layers=2, d_model=32,
                                                num_heads=2, mlp_dim=64, window_size=8))
    model = TransformerLM(config)
    rng = np.random.default_rng(0)
    prefix = rng.integers(0, 60, 30).astype(np.int32)
    answers = [rng.integers(0, 60, n).astype(np.int32) for n in (1, 5, 3, 2)]
    params = jax.jit(model.init)(jax.random.PRNGKey(0), prefix[None])["params"]

    scores = answer_log_likelihoods(model, params, pad_id=63, answer_room=5)(prefix, answers)
    losses_of = jax.jit(lambda row: model.apply({"params": params}, row[:, :-1],
                                                targets=row[:, 1:]))
    for answer, got in zip(answers, scores, strict=True):
        losses = losses_of(np.concatenate([prefix, answer])[None])
        assert got == pytest.approx(-float(losses[0, -len(answer):].sum()), rel=1e-5)


def _full_pass_greedy(model, params, length):
    """``decode(prompt)``: greedy decoding the slow way, the whole sequence through the model
    for each token (the row padded to its final length; causal attention keeps the padding
    out of earlier positions)."""
    logits = jax.jit(lambda tokens: model.apply({"params": params}, tokens[None])[0])

    def decode(prompt):
        tokens = np.concatenate([prompt, np.zeros(length, np.int32)])
        for step in range(len(prompt), len(tokens)):
            tokens[step] = np.argmax(logits(tokens)[step - 1])
        return tokens[len(prompt):]

    return decode


def test_greedy_continuations_equal_greedy_decoding_by_full_passes():
    """The rolling caches (with a global layer: a cache of the whole prompt) give the tokens
    that argmax over the full forward pass gives, in batches (the last one filled up)."""
    config = TransformerConfig.from_config(dict(vocab_size=64, num_layers=2, d_model=32,
                                                num_heads=2, mlp_dim=64, window_size=8,
                                                global_layers=2))
    model = TransformerLM(config)
    rng = np.random.default_rng(3)
    prompts = rng.integers(0, 64, (5, 30)).astype(np.int32)
    params = jax.jit(model.init)(jax.random.PRNGKey(1), prompts[:1])["params"]
    continued = greedy_continuations(params, config, 5, batch=2)(prompts)
    decode = _full_pass_greedy(model, params, 5)
    for prompt, continuation in zip(prompts, continued, strict=True):
        np.testing.assert_array_equal(continuation, decode(prompt))


def test_copied_digits_compares_each_digit_in_its_place():
    assert copied_digits(48213, "48213").all()
    assert copied_digits(48213, " 48213 and more").all()  # a SentencePiece answer's space
    np.testing.assert_array_equal(copied_digits(48213, "48231"), [1, 1, 1, 0, 0])
    np.testing.assert_array_equal(copied_digits(48213, "482"), [1, 1, 1, 0, 0])  # cut short
    np.testing.assert_array_equal(copied_digits(48213, "x8213"), [0, 1, 1, 1, 1])


def test_bands_sort_keys_by_reach_and_weigh_rows_by_trials():
    # W = 16, L·W = 32: within W while the key's first digit is <= 16 tokens back.
    assert [distance_band(d, 16, 32) for d in (12, 13, 32, 33)] == \
        ["within W", "W to L·W", "W to L·W", "beyond L·W"]
    row = dict(accuracy=1.0, exact_copies=0.5, digit_accuracy=0.8,
               digit_accuracy_by_position=[1.0, 1.0, 1.0, 0.5, 0.5])
    rows = [dict(row, key_distance=40, band="beyond L·W", trials=3),
            dict(row, key_distance=10, band="within W", trials=2),
            dict(row, key_distance=60, band="beyond L·W", trials=1, accuracy=0.0,
                 exact_copies=0.0, digit_accuracy_by_position=[0.0] * 5)]
    bands = passkey_bands(rows)
    assert [b["band"] for b in bands] == ["within W", "beyond L·W"]  # in BANDS order
    beyond = bands[1]
    assert beyond["key_distances"] == [40, 60] and beyond["trials"] == 4
    assert beyond["accuracy"] == pytest.approx(0.75) and beyond["exact_copies"] == \
        pytest.approx(0.375)
    assert beyond["digit_accuracy_by_position"] == pytest.approx([0.75] * 3 + [0.375] * 2)


def test_passkey_accuracy_is_the_share_of_trials_where_the_true_key_scores_highest():
    """The probe against a recount of the same trials (keys and filler cuts drawn from the
    same seed): each candidate scored from the model's whole logits (log-softmax of the full
    forward pass, not the chunked losses), the true key first or not; and the greedy answer
    decoded by full passes, compared digit by digit. The model's digit embeddings are
    scaled up so that it answers in digits: its ranking and its digits are random, so the
    shares are neither 0 nor 1."""
    import jax.numpy as jnp

    from data.passkey import QUESTION, passkey_parts, random_keys
    from data.tokenizers import ByteTokenizer
    from probes import passkey_accuracy, passkey_prompt

    tokenizer = ByteTokenizer()
    config = TransformerConfig.from_config(dict(vocab_size=tokenizer.vocab_size, num_layers=2,
                                                d_model=32, num_heads=2, mlp_dim=64,
                                                window_size=16))
    model = TransformerLM(config)
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(4),
                                          jnp.zeros((1, 8), jnp.int32))["params"])
    digits = np.arange(ord("0"), ord("9") + 1)
    params["embed"]["embedding"] = params["embed"]["embedding"].at[digits].multiply(8.0)
    filler = np.random.default_rng(1).integers(32, 127, 400).astype(np.int32)
    distances, trials = [3, 60], 12
    rows = passkey_accuracy(params, config, tokenizer, filler, distances, trials, seed=5)

    log_softmax = jax.jit(lambda tokens: jax.nn.log_softmax(
        model.apply({"params": params}, tokens), axis=-1))
    decode = _full_pass_greedy(model, params, 5)
    rng = np.random.default_rng(5)
    right_digits = 0
    for row, distance in zip(rows, distances, strict=True):
        correct, exact, right = 0, 0, np.zeros(5)
        for _ in range(trials):
            keys = random_keys(rng, 8)
            # Every prompt as long as the longest distance's: the planted sentence (36 bytes),
            # 60 bytes of text, the question (39 bytes).
            prefix = passkey_prompt(tokenizer, keys[0], filler, distance, 36 + 60 + 39, rng)
            planted, question, _ = passkey_parts(tokenizer, keys[0])
            assert len(prefix) == 135 and tokenizer.decode(prefix).endswith(QUESTION)
            at = len(prefix) - len(question) - distance - len(planted)
            np.testing.assert_array_equal(prefix[at:at + len(planted)], planted)
            # Bytes: every answer is its 5 digits, so the 8 candidates make one batch.
            answers = np.stack([passkey_parts(tokenizer, key)[2] for key in keys])
            tokens = np.concatenate([np.tile(prefix, (len(keys), 1)), answers], axis=1)
            log_probs = np.asarray(log_softmax(jnp.asarray(tokens[:, :-1])))[:, len(prefix) - 1:]
            scores = np.take_along_axis(log_probs, answers[..., None], axis=-1).sum(axis=(1, 2))
            correct += int(np.argmax(scores) == 0)
            written = decode(prefix)
            matches = written == answers[0]
            exact += int(matches.all())
            right += matches
        assert row["accuracy"] == correct / trials, (row, correct)
        assert row["exact_copies"] == exact / trials
        np.testing.assert_allclose(row["digit_accuracy_by_position"], right / trials)
        assert row["digit_accuracy"] == pytest.approx(right.mean() / trials)
        assert row["trials"] == trials and row["chance"] == 1 / 8
        right_digits += right.sum()
    assert 0 < sum(row["accuracy"] for row in rows) < len(rows)
    assert 0 < right_digits < 5 * trials * len(rows)


def test_a_passkey_prompt_begins_with_the_tokenizers_bos():
    """With a pretrained model's BOS (data/tokenizers.py's ``begin_of_document_id``) the
    prompt begins a document as that model saw them: the BOS first, the length unchanged."""
    from data.passkey import QUESTION, prompt_length
    from data.tokenizers import ByteTokenizer
    from probes import passkey_prompt

    class WithBos(ByteTokenizer):
        begin_of_document_id = 300

    filler = np.random.default_rng(1).integers(32, 127, 400).astype(np.int32)
    for tokenizer in (ByteTokenizer(), WithBos()):
        length = prompt_length(tokenizer, 60)
        prompt = passkey_prompt(tokenizer, 12345, filler, 60, length, np.random.default_rng(0))
        assert len(prompt) == length and tokenizer.decode(prompt).endswith(QUESTION)
        assert (prompt[0] == 300) == (tokenizer.begin_of_document_id is not None)
        assert (prompt == 300).sum() <= 1
    assert prompt_length(WithBos(), 60) == prompt_length(ByteTokenizer(), 60) + 1
