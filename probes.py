"""Long-range probes of a trained model: how much it gains from distant tokens.

* `loss_by_distance_band`: the loss of the tokens that have 0–W, W–L·W and more than L·W
  tokens of context before them (W = window_size, L = num_layers): a model of local layers
  reaches at most L·W tokens back, so its loss beyond that band can only match, never beat,
  the middle band's; global layers can.
* `passkey_accuracy`: a random five-digit key planted in validation text at a chosen distance
  before the question that asks for it (``the pass key is 48213. remember it. `` ... filler
  ... `` what is the pass key? the pass key is ``). The model ranks the true key against
  ``candidates - 1`` random others by the log-likelihood of their tokens (lenient: a copy
  with its digits out of order still ranks first); accuracy is how often the true key ranks
  first, chance ``1 / candidates``. The strict measure beside it: how often greedy decoding
  writes the key exactly, and each digit's accuracy. `passkey_bands` sums the trials by how
  far the key lies: within one window W, within the local reach L·W, or beyond it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from typing import NamedTuple

from data.passkey import (KEY_DIGITS, key_distance, key_tokens, passkey_parts, prompt_length,
                          random_keys)
from data.pipeline import split_tokens
from data.tokenizers import encode_document
from errors import UserError
from model import TransformerConfig, TransformerLM, generate

BANDS = ("within W", "W to L·W", "beyond L·W")


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


def passkey_prompt(tokenizer, key: int, filler: np.ndarray, distance: int, length: int,
                   rng: np.random.Generator) -> np.ndarray:
    """One trial's prompt: ``length`` int32 ids ending with the question, ``distance`` ids of
    text between the planted sentence (with ``key``) and the question, and text before the
    sentence to fill the length, so that every trial asks at the same position and the probe
    compiles once. Both stretches of text are cut from ``filler`` at offsets drawn from
    ``rng`` (the one between first). The prompt begins a document: with the tokenizer's BOS
    where it has one (`data.tokenizers.encode_document`)."""
    planted, question, _ = passkey_parts(tokenizer, key)
    begin = encode_document(tokenizer, "")
    lead = length - len(begin) - len(planted) - distance - len(question)
    start = rng.integers(0, len(filler) - distance + 1)
    lead_start = rng.integers(0, len(filler) - lead + 1)
    return np.concatenate([begin, filler[lead_start:lead_start + lead], planted,
                           filler[start:start + distance], question]).astype(np.int32)


def passkey_accuracy(params, config: TransformerConfig, tokenizer, filler: np.ndarray,
                     distances: list[int], trials: int = 16, candidates: int = 8,
                     seed: int = 0) -> list[dict]:
    """Retrieval of a planted key against its distance from the question: ranked and copied.

    Args:
      params: the model's parameters; config: its `TransformerConfig`; tokenizer: the run's.
      filler: int token ids of validation text (at least ``max(distances)`` plus a key's
        `key_tokens` long), cut at random offsets around the planted sentence
        (`passkey_prompt`; every prompt as long as the longest distance's).
      distances: text tokens between the planted sentence and the question.
      trials, candidates: keys per distance; keys ranked per trial (the true one included).
      seed: the keys and filler offsets follow from it.

    Returns one dict per distance: ``distance``, ``key_distance`` (tokens from the key's last
    token to the question's end: beyond L·W no answer token of a local model sees the key),
    ``band`` (`distance_band`), ``accuracy`` (the true key ranked first), ``exact_copies``
    (greedy decoding wrote all `KEY_DIGITS` digits right), ``digit_accuracy`` (the share of
    digits right) and ``digit_accuracy_by_position`` (one share per digit, first to last),
    ``chance`` (of the ranking), ``trials``. Raises a one-line `UserError` for trials < 1,
    candidates < 2 or a distance outside ``0..len(filler) - key_tokens``.
    """
    if trials < 1 or candidates < 2:
        raise UserError(f"--probe_trials={trials}, candidates={candidates}: expected >= 1 "
                        f"trial and >= 2 candidates")
    room = key_tokens(tokenizer)
    if max(distances) > len(filler) - room or min(distances) < 0:
        raise UserError(f"--probe_distances={distances}: expected distances in 0.."
                        f"{len(filler) - room} (the validation text's length less a key)")
    length = prompt_length(tokenizer, max(distances))
    score = answer_log_likelihoods(TransformerLM(config), params, tokenizer.pad_id, room)
    continue_greedily = greedy_continuations(params, config, room, batch=candidates)
    rng = np.random.default_rng(seed)
    rows = []
    for distance in distances:
        correct, prompts, true_keys = 0, [], []
        for _ in range(trials):
            keys = random_keys(rng, candidates)
            prompt = passkey_prompt(tokenizer, int(keys[0]), filler, distance, length, rng)
            scores = score(prompt, [passkey_parts(tokenizer, key)[2] for key in keys])
            correct += int(np.argmax(scores) == 0)
            prompts.append(prompt)
            true_keys.append(int(keys[0]))
        answers = continue_greedily(np.stack(prompts))
        right = np.stack([copied_digits(key, tokenizer.decode(_until_special(answer, tokenizer)))
                          for key, answer in zip(true_keys, answers, strict=True)])
        far = key_distance(tokenizer, int(distance))
        rows.append({"distance": int(distance), "key_distance": far,
                     "band": distance_band(far, config.window_size,
                                           config.window_size * config.num_layers),
                     "accuracy": correct / trials,
                     "exact_copies": float(right.all(axis=1).mean()),
                     "digit_accuracy": float(right.mean()),
                     "digit_accuracy_by_position": right.mean(axis=0).tolist(),
                     "chance": 1.0 / candidates, "trials": trials})
    return rows


def answer_log_likelihoods(model: TransformerLM, params, pad_id: int, answer_room: int):
    """``score(prefix, answers)``: the log-likelihood (float32 ``(len(answers),)``) of each
    answer's token ids after the ``prefix`` ids, in one batch. Answers may have different
    lengths up to ``answer_room`` (a SentencePiece tokenization of five digits has one to five
    pieces): each row is padded after its answer to ``answer_room`` (one compilation per
    prefix length), and only the answer's tokens count. Raises a ValueError for an answer
    longer than ``answer_room``."""
    @jax.jit
    def masked_sums(tokens, counted):  # (rows, length) int32, (rows, length - 1) float32
        losses = model.apply({"params": params}, tokens[:, :-1], targets=tokens[:, 1:])
        return -(losses * counted).sum(axis=1)

    def score(prefix: np.ndarray, answers: list[np.ndarray]) -> np.ndarray:
        if max(len(answer) for answer in answers) > answer_room:
            raise ValueError(f"answers of {[len(a) for a in answers]} tokens: expected at most "
                             f"answer_room={answer_room}")
        width = len(prefix) + answer_room
        tokens = np.full((len(answers), width), pad_id, np.int32)
        counted = np.zeros((len(answers), width - 1), np.float32)
        tokens[:, :len(prefix)] = prefix
        for row, answer in enumerate(answers):
            tokens[row, len(prefix):len(prefix) + len(answer)] = answer
            # The loss at position i is that of token i + 1.
            counted[row, len(prefix) - 1:len(prefix) - 1 + len(answer)] = 1.0
        return np.asarray(masked_sums(jnp.asarray(tokens), jnp.asarray(counted)))

    return score


def _until_special(ids: np.ndarray, tokenizer) -> np.ndarray:
    """``ids`` up to the first end-of-document or padding id, which ends an answer (and which
    decoding would drop, joining the digits around it)."""
    special = np.isin(ids, [tokenizer.end_of_document_id, tokenizer.pad_id])
    return ids[:np.argmax(special)] if special.any() else ids


def copied_digits(key: int, text: str) -> np.ndarray:
    """Which of ``key``'s digits the greedy answer ``text`` (leading spaces dropped) writes in
    their place: bool ``(KEY_DIGITS,)``; a digit that is missing counts as wrong."""
    text = text.lstrip()
    return np.array([i < len(text) and text[i] == digit for i, digit in enumerate(str(key))])


def greedy_continuations(params, config: TransformerConfig, length: int, batch: int):
    """``continue_greedily(prompts)``: for int32 ``prompts (n, prompt_len)``, the
    ``(n, length)`` token ids that greedy decoding (`model.generate` at temperature 0, with
    the rolling caches) appends to each, ``batch`` rows at a time (the last call filled up
    with copies of a row, so that it compiles once)."""
    @jax.jit
    def greedy(params, prompts):
        return generate(params, prompts, jax.random.key(0), config=config,
                        max_new_tokens=length, temperature=0.0)[0]

    def continue_greedily(prompts: np.ndarray) -> np.ndarray:
        continued = []
        for first in range(0, len(prompts), batch):
            rows = prompts[first:first + batch]
            filled = np.concatenate([rows, np.repeat(rows[:1], batch - len(rows), axis=0)])
            continued.append(np.asarray(greedy(params, jnp.asarray(filled)))[:len(rows)])
        return np.concatenate(continued)

    return continue_greedily


def distance_band(key_distance: int, window: int, reach: int) -> str:
    """Where a key ``key_distance`` tokens back lies for a model of window W and local reach
    L·W = ``reach``: ``within W`` where every digit of a `KEY_DIGITS`-token key is within one
    window of the token that predicts its copy (key_distance + KEY_DIGITS - 1 <= W; digit i
    is predicted i tokens after the question's end and lies i tokens after the key's first),
    ``beyond L·W`` where even the key's last token is out of a local stack's reach
    (key_distance > L·W), ``W to L·W`` between: reachable by relaying through layers."""
    if key_distance + KEY_DIGITS - 1 <= window:
        return BANDS[0]
    return BANDS[2] if key_distance > reach else BANDS[1]


def passkey_bands(rows: list[dict]) -> list[dict]:
    """The rows of `passkey_accuracy` summed by their ``band``: one dict per band that has
    rows, in `BANDS` order: ``band``, ``key_distances`` ([least, most]), ``trials`` and the
    trial-weighted ``accuracy``, ``exact_copies``, ``digit_accuracy`` and
    ``digit_accuracy_by_position``."""
    bands = []
    for name in BANDS:
        members = [row for row in rows if row["band"] == name]
        if not members:
            continue
        trials = np.array([row["trials"] for row in members], float)
        distances = [row["key_distance"] for row in members]
        bands.append({"band": name, "key_distances": [min(distances), max(distances)],
                      "trials": int(trials.sum())} | {
            field: (np.array([row[field] for row in members]).T @ trials / trials.sum()).tolist()
            for field in ("accuracy", "exact_copies", "digit_accuracy",
                          "digit_accuracy_by_position")})
    return bands


class PasskeyResult(NamedTuple):
    """What `passkey_probe` found: the rows of `passkey_accuracy`, their `passkey_bands`, and
    the model's window W and local reach L·W."""

    rows: list[dict]
    bands: list[dict]
    window: int
    reach: int


def passkey_probe(run, distances: list[int], trials: int) -> PasskeyResult:
    """`passkey_accuracy` of a trained run (`inference.LoadedRun`), the filler from its
    validation split, and its `passkey_bands`; ``distances`` empty: multiples of the window W
    and of the local reach L·W (W/2, W, 2W, L·W/2, L·W, 2·L·W, 4·L·W)."""
    config, model_cfg = run.config, run.model_config
    window, reach = model_cfg.window_size, model_cfg.window_size * model_cfg.num_layers
    distances = distances or sorted({window // 2, window, 2 * window, reach // 2, reach,
                                     2 * reach, 4 * reach})
    filler = np.asarray(split_tokens(config.data, "validation", run.tokenizer))
    rows = passkey_accuracy(run.params, model_cfg, run.tokenizer, filler, distances, trials,
                            seed=config.seed)
    return PasskeyResult(rows, passkey_bands(rows), window, reach)


def format_passkey_table(result: PasskeyResult) -> str:
    """The passkey results as plain-text tables: by distance, then by band."""
    lines = [f"W = {result.window}, L·W = {result.reach}; ranking chance "
             f"{result.rows[0]['chance']:.3f}",
             "distance  key distance  band        ranking  exact copies  digits"]
    lines += [f"{r['distance']:>8}  {r['key_distance']:>12}  {r['band']:<10}  "
              f"{r['accuracy']:>7.2f}  {r['exact_copies']:>12.2f}  {r['digit_accuracy']:>6.2f}"
              for r in result.rows]
    lines += ["", "band        key distances  trials  ranking  exact copies  digits by position"]
    lines += [f"{b['band']:<10}  {b['key_distances'][0]:>6}-{b['key_distances'][1]:<6}  "
              f"{b['trials']:>6}  {b['accuracy']:>7.2f}  {b['exact_copies']:>12.2f}  "
              + " ".join(f"{d:.2f}" for d in b["digit_accuracy_by_position"])
              for b in result.bands]
    return "\n".join(lines)
