"""probes.py: the passkey probe's scoring of candidate answers."""

import jax
import numpy as np
import pytest

from model import TransformerConfig, TransformerLM
from probes import answer_log_likelihoods


def test_answers_of_different_lengths_score_as_each_alone():
    """A SentencePiece key is one to five pieces: the batched, padded scores equal each
    answer's log-likelihood computed on its own, unpadded row."""
    config = TransformerConfig.from_config(dict(vocab_size=64, num_layers=2, d_model=32,
                                                num_heads=2, mlp_dim=64, window_size=8))
    model = TransformerLM(config)
    rng = np.random.default_rng(0)
    prefix = rng.integers(0, 60, 30).astype(np.int32)
    answers = [rng.integers(0, 60, n).astype(np.int32) for n in (1, 5, 3, 2)]
    params = model.init(jax.random.PRNGKey(0), prefix[None])["params"]

    scores = answer_log_likelihoods(model, params, pad_id=63)(prefix, answers)
    for answer, got in zip(answers, scores, strict=True):
        row = np.concatenate([prefix, answer])[None]
        losses = model.apply({"params": params}, row[:, :-1], targets=row[:, 1:])
        assert got == pytest.approx(-float(losses[0, -len(answer):].sum()), rel=1e-5)


def test_passkey_accuracy_is_the_share_of_trials_where_the_true_key_scores_highest():
    """The probe's accuracy against a recount: the same trials (keys and filler cuts drawn
    from the same seed), each candidate scored from the model's whole logits
    (log-softmax of the full forward pass, not the chunked losses), the true key first or
    not. A random model ranks the keys at random, so the accuracies are neither 0 nor 1."""
    import jax.numpy as jnp

    from data.passkey import passkey_parts, random_keys
    from data.tokenizers import ByteTokenizer
    from probes import passkey_accuracy

    tokenizer = ByteTokenizer()
    config = TransformerConfig.from_config(dict(vocab_size=tokenizer.vocab_size, num_layers=2,
                                                d_model=32, num_heads=2, mlp_dim=64,
                                                window_size=16))
    model = TransformerLM(config)
    params = model.init(jax.random.PRNGKey(4), jnp.zeros((1, 8), jnp.int32))["params"]
    filler = np.random.default_rng(1).integers(32, 127, 400).astype(np.int32)
    distances, trials = [3, 60], 12
    rows = passkey_accuracy(params, config, tokenizer, filler, distances, trials, seed=5)

    log_softmax = jax.jit(lambda tokens: jax.nn.log_softmax(
        model.apply({"params": params}, tokens), axis=-1))
    rng = np.random.default_rng(5)
    for row, distance in zip(rows, distances, strict=True):
        correct = 0
        for _ in range(trials):
            keys = random_keys(rng, 8)
            start = rng.integers(0, len(filler) - distance + 1)
            planted, question, _ = passkey_parts(tokenizer, keys[0])
            prefix = np.concatenate([planted, filler[start:start + distance], question])
            # Bytes: every answer is its 5 digits, so the 8 candidates make one batch.
            answers = np.stack([passkey_parts(tokenizer, key)[2] for key in keys])
            tokens = np.concatenate([np.tile(prefix, (len(keys), 1)), answers], axis=1)
            log_probs = np.asarray(log_softmax(jnp.asarray(tokens[:, :-1])))[:, len(prefix) - 1:]
            scores = np.take_along_axis(log_probs, answers[..., None], axis=-1).sum(axis=(1, 2))
            correct += int(np.argmax(scores) == 0)
        assert row["accuracy"] == correct / trials, (row, correct)
        assert row["trials"] == trials and row["chance"] == 1 / 8
    assert 0 < sum(row["accuracy"] for row in rows) < len(rows)
