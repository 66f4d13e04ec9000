"""Long-range probes of a trained model: how much it gains from distant tokens.

* `loss_by_distance_band`: the loss of the tokens that have 0–W, W–L·W and more than L·W
  tokens of context before them (W = window_size, L = num_layers): a model of local layers
  reaches at most L·W tokens back, so its loss beyond that band can only match, never beat,
  the middle band's; global layers can.
* `passkey_accuracy`: a random five-digit key planted in validation text at a chosen distance
  before the question that asks for it (``the pass key is 48213. remember it. `` ... filler
  ... `` what is the pass key? the pass key is ``). The model ranks the true key against
  ``candidates - 1`` random others by the log-likelihood of their tokens (robust for small
  models, which rarely generate the exact digits greedily); accuracy is how often the true
  key ranks first, chance ``1 / candidates``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from data.passkey import key_distance, passkey_parts, random_keys
from data.pipeline import split_tokens
from model import TransformerConfig, TransformerLM


def loss_by_distance_band(loss_by_position: np.ndarray, tokens_by_position: np.ndarray,
                          window_size: int, num_layers: int) -> list[dict]:
    """The loss of the targets at context positions ``[0, W)``, ``[W, L·W)`` and ``[L·W, ...)``.

    Args: the per-position sums of `steps.make_eval_step` (``(seq_len,)`` float), the model's
    window and layer count. Returns one dict per band: ``band`` (a name), ``start``, ``end``
    (positions; None: open), ``tokens`` and ``loss`` (mean nats per token; None without tokens).
    The bands' tokens add up to all the tokens, their token-weighted losses to the mean loss.
    """
    reach = window_size * num_layers
    edges = [(0, window_size, "0-W"), (window_size, reach, "W-LW"), (reach, None, ">LW")]
    bands = []
    for start, end, name in edges:
        tokens = float(np.sum(tokens_by_position[start:end]))
        loss = float(np.sum(loss_by_position[start:end])) / tokens if tokens else None
        bands.append({"band": name, "start": start, "end": end, "tokens": tokens, "loss": loss})
    return bands


def passkey_accuracy(params, config: TransformerConfig, tokenizer, filler: np.ndarray,
                     distances: list[int], trials: int = 16, candidates: int = 8,
                     seed: int = 0) -> list[dict]:
    """Accuracy of retrieving a planted key against its distance from the question.

    Args:
      params: the model's parameters; config: its `TransformerConfig`; tokenizer: the run's.
      filler: int token ids of validation text (at least ``max(distances)`` long), cut at
        random offsets between the planted key and the question.
      distances: filler tokens between the planted sentence and the question.
      trials, candidates: keys per distance; keys ranked per trial (the true one included).
      seed: the keys and filler offsets follow from it.

    Returns one dict per distance: ``distance``, ``key_distance`` (tokens from the key's last
    token to the question's end: beyond L·W no answer token of a local model sees the key),
    ``accuracy``, ``chance``, ``trials``.
    """
    if trials < 1 or candidates < 2:
        raise ValueError(f"--probe_trials={trials}, candidates={candidates}: expected >= 1 "
                         f"trial and >= 2 candidates")
    longest = max(distances)
    if longest > len(filler) or min(distances) < 0:
        raise ValueError(f"--probe_distances={distances}: expected distances in 0.."
                         f"{len(filler)} (the validation text's length)")
    score = answer_log_likelihoods(TransformerLM(config), params, tokenizer.pad_id)
    rng = np.random.default_rng(seed)
    rows = []
    for distance in distances:
        correct = 0
        for _ in range(trials):
            keys = random_keys(rng, candidates)
            start = rng.integers(0, len(filler) - distance + 1)
            planted, question, _ = passkey_parts(tokenizer, keys[0])
            prefix = np.concatenate([planted, filler[start:start + distance], question])
            scores = score(prefix, [passkey_parts(tokenizer, key)[2] for key in keys])
            correct += int(np.argmax(scores) == 0)
        rows.append({"distance": int(distance),
                     "key_distance": key_distance(tokenizer, int(distance)),
                     "accuracy": correct / trials,
                     "chance": 1.0 / candidates, "trials": trials})
    return rows


def answer_log_likelihoods(model: TransformerLM, params, pad_id: int):
    """``score(prefix, answers)``: the log-likelihood (float32 ``(len(answers),)``) of each
    answer's token ids after the ``prefix`` ids, in one batch. Answers may have different
    lengths (a SentencePiece tokenization of five digits has one to five pieces): each row is
    padded after its answer, and only the answer's tokens count."""
    @jax.jit
    def masked_sums(tokens, counted):  # (rows, length) int32, (rows, length - 1) float32
        losses = model.apply({"params": params}, tokens[:, :-1], targets=tokens[:, 1:])
        return -(losses * counted).sum(axis=1)

    def score(prefix: np.ndarray, answers: list[np.ndarray]) -> np.ndarray:
        width = len(prefix) + max(len(answer) for answer in answers)
        tokens = np.full((len(answers), width), pad_id, np.int32)
        counted = np.zeros((len(answers), width - 1), np.float32)
        tokens[:, :len(prefix)] = prefix
        for row, answer in enumerate(answers):
            tokens[row, len(prefix):len(prefix) + len(answer)] = answer
            # The loss at position i is that of token i + 1.
            counted[row, len(prefix) - 1:len(prefix) - 1 + len(answer)] = 1.0
        return np.asarray(masked_sums(jnp.asarray(tokens), jnp.asarray(counted)))

    return score


def passkey_probe(run, distances: list[int], trials: int) -> tuple[list[dict], int]:
    """`passkey_accuracy` of a trained run (`inference.LoadedRun`), the filler from its
    validation split; ``distances`` empty: multiples of the window W and of the local reach
    L·W (W/2, W, 2W, L·W/2, L·W, 2·L·W, 4·L·W). Returns the rows and the reach L·W."""
    config, model_cfg = run.config, run.model_config
    window, reach = model_cfg.window_size, model_cfg.window_size * model_cfg.num_layers
    distances = distances or sorted({window // 2, window, 2 * window, reach // 2, reach,
                                     2 * reach, 4 * reach})
    filler = np.asarray(split_tokens(config.data, "validation", run.tokenizer))
    return passkey_accuracy(run.params, model_cfg, run.tokenizer, filler, distances, trials,
                            seed=config.seed), reach


def format_passkey_table(rows: list[dict]) -> str:
    """The passkey results as a plain-text table."""
    lines = ["distance  key distance  accuracy  chance"]
    lines += [f"{r['distance']:>8}  {r['key_distance']:>12}  {r['accuracy']:>8.2f}  "
              f"{r['chance']:>6.3f}" for r in rows]
    return "\n".join(lines)
