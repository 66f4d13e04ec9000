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
