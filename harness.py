"""Score a trained run on lm-evaluation-harness tasks, in process: the run's own tokenizer and
parameters, no export.

    python harness.py --workdir=runs/default --tasks=niah_single_1,TASK
        [--include_path=DIR] [--limit=N] [--max_length=8192] [--batch_tokens=16384]
        [--metadata='{"max_seq_lengths": [4096]}'] [--output=results.json] [--step=N]

`RunLM` is an lm-eval ``LM`` (its ``TemplateLM``, so contexts and continuations are encoded
as lm-eval encodes them for every causal model) handed to ``lm_eval.simple_evaluate(model=...)``:
the harness's own command line cannot load it. The harness calls each request type once with
all its requests; batching is ours:

- ``loglikelihood``: each context + continuation (left-truncated to ``max_length + 1``
  tokens, as lm-eval's ``hf`` backend does) is packed with others into rows of ``max_length``
  tokens, each in its own segment with positions from 0 (Levanter's design), and one jitted
  step (one compile) scores ``rows`` rows at a time: the continuation's log-probability and
  whether greedy decoding gives it.
- ``loglikelihood_rolling``: a document in lm-eval's rolling windows of ``max_length``
  tokens (``lm_eval.utils.get_rolling_token_windows``), which may be far beyond the trained
  context: local attention makes a window cost linear in its length. The windows are packed and
  scored as above, by the model's chunked cross-entropy (evaluate_run.py's), so the
  ``(tokens, vocabulary)`` logits never exist.
- ``generate_until``: greedy decoding by `model.generate` with its rolling caches (what
  generate.py runs), prompts of equal length and settings in one batch; a request's stop
  strings cut the text as lm-eval's backends cut it, and the end-of-document token ends it.

The token that stands for "no context" (lm-eval's ``prefix_token_id``, before a document or an
empty context) is the end-of-document id. A run trained with ``data.packing='documents'`` never
saw it at the start of a document's segment: as in its training rows, it has a segment of its
own and the document starts its segment at position 0 (``data.packing='stream'``: one segment,
as lm-eval's ``hf`` backend reads ``[EOD, tokens...]``). docs/evaluation.md states what this
changes against evaluate_run.py's bits per byte, exactly.

Several processes (launch.py): process 0 runs the harness and announces each step with its
inputs; the others run the same steps (`RunLM.follow`) until it says stop.

RULER's synthetic tasks size their text with a Hugging Face tokenizer: the run's own, written
by hf/tokenizer.py into a temporary folder, is ``metadata["tokenizer"]`` unless ``--metadata``
names another.
"""

from __future__ import annotations

import collections
import io
import json
import os
import sys
import tempfile
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging

import cli
import inference
import launch
import sharding
import steps
from data.tokenizers import encode_document
from errors import UserError
from hf.tokenizer import export_tokenizer
from model import TransformerLM, generate

try:  # requirements-eval.txt, apart from the training requirements
    import lm_eval
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.utils import (handle_stop_sequences, normalize_gen_kwargs,
                                      postprocess_generated_text)
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, make_table
except ModuleNotFoundError as missing:
    sys.exit(f"error: harness.py needs lm-eval ({missing.name} is not installed): "
             f"pip install -r requirements-eval.txt")

FLAGS = flags.FLAGS
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default where a task sets no max_gen_toks

# What process 0 announces before each step (`RunLM.follow`), with its inputs.
_STOP, _SCORE, _SCORE_GREEDY, _GENERATE = range(4)
_WAIT_MS = 24 * 3600 * 1000  # how long the others wait for the next step: a day


class Piece(NamedTuple):
    """One scored sequence: the model reads ``tokens[:-1]`` and predicts ``tokens[1:]``, of
    which the last ``scored`` count. ``prefixed``: ``tokens[0]`` is the prefix token, standing
    for "no context"."""

    tokens: list[int]
    scored: int
    prefixed: bool


def pack_rows(pieces: list[Piece], length: int, pad_id: int, prefix_alone: bool,
              max_segments: int = 0) -> tuple[dict[str, np.ndarray], list[tuple[int, int, int]]]:
    """``pieces`` (each at most ``length + 1`` tokens) packed into rows of ``length`` inputs,
    first fit in order of decreasing length.

    Returns the rows, a dict of ``(rows, length)`` arrays (data/packing.py's names:
    ``inputs``, ``targets``, ``segment_ids``, ``positions`` int32 and ``loss_mask`` float32,
    1 on scored targets), padding segment 0; and each piece's ``(row, start, stop)``, the
    columns of its scored targets. A piece has its own segment (ids from 1 in each row) and
    positions from 0; with ``prefix_alone`` a prefixed piece's prefix token is a segment of its
    own too, the rest starting again at position 0 (see the module docstring).
    ``max_segments``: at most this many segments per row, padding counted (0: no bound; the
    bound of cuDNN's packed layout, `model.config.TransformerConfig.document_bound`).
    """
    free, used, placed = [], [], {}
    for index in sorted(range(len(pieces)), key=lambda i: -len(pieces[i].tokens)):
        size = len(pieces[index].tokens) - 1
        needed = 1 + (prefix_alone and pieces[index].prefixed)
        row = next((r for r, room in enumerate(free) if room >= size and (
            not max_segments or used[r] + needed + 1 <= max_segments)), None)
        if row is None:
            row = len(free)
            free.append(length)
            used.append(0)
        placed[index] = (row, length - free[row], used[row] + 1)
        free[row] -= size
        used[row] += needed
    rows = len(free)
    batch = {name: np.zeros((rows, length), np.int32)
             for name in ("inputs", "targets", "segment_ids", "positions")}
    batch["inputs"][:] = pad_id
    batch["loss_mask"] = np.zeros((rows, length), np.float32)
    spans = []
    for index, piece in enumerate(pieces):
        row, start, segment = placed[index]
        size = len(piece.tokens) - 1
        stop = start + size
        batch["inputs"][row, start:stop] = piece.tokens[:-1]
        batch["targets"][row, start:stop] = piece.tokens[1:]
        batch["segment_ids"][row, start:stop] = segment
        batch["positions"][row, start:stop] = np.arange(size)
        if prefix_alone and piece.prefixed:
            batch["segment_ids"][row, start + 1:stop] = segment + 1
            batch["positions"][row, start + 1:stop] = np.arange(size - 1)
        batch["loss_mask"][row, stop - piece.scored:stop] = 1
        spans.append((row, stop - piece.scored, stop))
    return batch, spans


def make_score_step(run: inference.LoadedRun, greedy: bool):
    """The jitted ``(params, batch) -> scores`` over packed rows (`pack_rows`), rows and
    results sharded over the mesh's data axes (no collective: under jax 0.12.1 a replicated
    result's all-gather between CPU processes hung): ``logprob`` ``(rows, length)`` float32 (the
    log-probability of each target, 0 off ``loss_mask``) and, with ``greedy``, ``greedy``
    ``(rows, length)`` bool (the target is the argmax). Without ``greedy`` the model's chunked
    cross-entropy (`steps.token_losses`) scores, so no ``(length, vocabulary)`` logits exist;
    with it, the logits of a whole step do."""
    model = TransformerLM(run.model_config)

    def score(params, batch):
        if not greedy:
            return {"logprob": -steps.token_losses(model, params, batch)}
        logits = model.apply({"params": params}, batch["inputs"],
                             segment_ids=batch["segment_ids"], positions=batch["positions"])
        targets = batch["targets"][..., None]
        logprob = jnp.take_along_axis(jax.nn.log_softmax(logits), targets, axis=-1)[..., 0]
        return {"logprob": logprob * batch["loss_mask"],
                "greedy": jnp.argmax(logits, axis=-1) == batch["targets"]}

    jitted = jax.jit(score, in_shardings=(jax.tree.map(lambda x: x.sharding, run.params),
                                          sharding.batch_sharding(run.mesh)),
                     out_shardings=sharding.batch_sharding(run.mesh))
    return sharding.with_rules(jitted, run.mesh, sharding.axis_rules(run.config))


def _local_rows(x: jax.Array) -> np.ndarray:
    """The rows of a batch-sharded array that this process holds, in order."""
    shards = {shard.index[0].indices(x.shape[0])[:2]: shard.data for shard in x.addressable_shards}
    return np.concatenate([np.asarray(shards[key]) for key in sorted(shards)])


class RunLM(TemplateLM):
    """lm-eval's ``LM`` over a restored run (`inference.load_for_inference`).

    ``max_length``: tokens per row, rolling window and prompt + generation (0: the training
    ``seq_len``); ``batch_tokens``: tokens per scoring step (``rows`` rows of ``max_length``,
    a multiple of the device count) and the most prompt + generated tokens per generation
    batch. Raises a one-line `UserError` where the mesh cannot split ``max_length``.
    """

    def __init__(self, run: inference.LoadedRun, max_length: int = 0, batch_tokens: int = 16384):
        super().__init__()
        self.run = run
        self.max_length = max_length or run.config.seq_len
        cfg = run.model_config
        sharding.check_length_fits_mesh(self.max_length, run.mesh, cfg.layer_chunk_size,
                                        cfg.window_size)
        devices = run.mesh.devices.size
        self.rows = devices * max(1, batch_tokens // (self.max_length * devices))
        self.batch_tokens = batch_tokens
        # Trained with isolated documents, a model saw the end-of-document token close the
        # document before; a BOS starts its own (data/packing.py).
        self.prefix_alone = (run.config.data.packing == "documents"
                             and run.tokenizer.begin_of_document_id is None)
        self._steps = {_SCORE: make_score_step(run, greedy=False),
                       _SCORE_GREEDY: make_score_step(run, greedy=True)}
        self._batch_sharding = sharding.batch_sharding(run.mesh)
        self._process_rows = sharding.process_rows(self._batch_sharding, self.rows)
        self._announced = 0  # steps announced to the other processes (`follow`)

    # --- the tokenizer, as lm-eval's TemplateLM asks ------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.run.tokenizer.end_of_document_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is (and rolling windows start from), as lm-eval's ``hf``
        backend: the tokenizer's BOS where it has one, else the end of document."""
        bos = self.run.tokenizer.begin_of_document_id
        return self.eot_token_id if bos is None else bos

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs) -> list[int]:
        """``string``'s ids, by default as a document begins (after the tokenizer's BOS where
        it has one: `data.tokenizers.encode_document`, as transformers' tokenizer for the
        ``hf`` backend); ``add_special_tokens=False``: the text's ids alone."""
        del kwargs
        if add_special_tokens is False:
            return [int(i) for i in self.run.tokenizer.encode(string)]
        return [int(i) for i in encode_document(self.run.tokenizer, string)]

    # --- the three request types ----------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False,
                              **kwargs) -> list[tuple[float, bool]]:
        """``requests``: ``((context, continuation), context_ids, continuation_ids)`` as
        TemplateLM encodes them -> ``(log-probability, greedy)`` of each continuation."""
        pieces = []
        for (context, _), context_ids, continuation_ids in requests:
            if len(continuation_ids) > self.max_length:
                raise UserError(f"a continuation of {len(continuation_ids)} tokens is longer "
                                f"than --max_length={self.max_length}")
            pieces.append(Piece((context_ids + continuation_ids)[-(self.max_length + 1):],
                                len(continuation_ids), context == ""))
        scores = self._score(pieces, greedy=True)
        results = [(float(logprob), bool(greedy)) for logprob, greedy in scores]
        for ((context, continuation), _, _), result in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", (context, continuation), result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each request's ``(text,)``: its log-probability from the prefix token, in lm-eval's
        rolling windows of ``max_length`` tokens (each token predicted once)."""
        pieces, owners = [], []
        for owner, request in enumerate(requests):
            # The text's ids alone: the prefix token is the BOS where there is one (lm-eval's
            # hf backend encodes a BOS here as well, and so scores a BOS after the BOS).
            windows = get_rolling_token_windows(
                self.tok_encode(request.args[0], add_special_tokens=False),
                self.prefix_token_id, self.max_length, 1)
            for index, window in enumerate(windows):
                context, predicted = make_disjoint_window(window)
                pieces.append(Piece(context + predicted, len(predicted), index == 0))
                owners.append(owner)
        totals = np.zeros(len(requests), np.float64)
        for owner, (logprob, _) in zip(owners, self._score(pieces, greedy=False), strict=True):
            totals[owner] += logprob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, float(total))
        return [float(total) for total in totals]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each request's ``(context, gen_kwargs)``: greedy text until a stop string of
        ``until``, the end-of-document token or ``max_gen_toks`` tokens (the prompt keeps its
        last ``max_length - max_gen_toks`` tokens, as lm-eval's ``hf`` backend). Raises a
        one-line `UserError` for sampling (``do_sample``) or ``max_gen_toks`` of
        ``max_length`` or more."""
        groups = collections.defaultdict(list)
        for index, request in enumerate(requests):
            context, gen_kwargs = request.args
            kwargs = normalize_gen_kwargs(gen_kwargs, DEFAULT_MAX_GEN_TOKS)
            if kwargs.get("do_sample"):
                raise UserError(f"a task asks for sampling ({gen_kwargs}); harness.py decodes "
                                f"greedily")
            new_tokens = kwargs["max_gen_toks"]
            if new_tokens >= self.max_length:
                raise UserError(f"a task asks for max_gen_toks={new_tokens}, not below "
                                f"--max_length={self.max_length}")
            until = handle_stop_sequences(kwargs["until"], eos=None)
            prompt = self.tok_encode(context)[-(self.max_length - new_tokens):]
            groups[len(prompt or [0]), new_tokens].append(
                (index, prompt or [self.eot_token_id], until))
        texts = [""] * len(requests)
        for (length, new_tokens), members in sorted(groups.items()):
            size = min(len(members), max(1, self.batch_tokens // (length + new_tokens)))
            for start in range(0, len(members), size):
                chunk = members[start:start + size]
                prompts = np.array([prompt for _, prompt, _ in chunk]
                                   + [chunk[0][1]] * (size - len(chunk)), np.int32)
                tokens, lengths = self._step(_GENERATE, {"prompts": prompts}, new_tokens)
                for row, (index, _, until) in enumerate(chunk):
                    text = self.run.tokenizer.decode(tokens[row, :lengths[row]])
                    texts[index] = postprocess_generated_text(text, until, None)
                    self.cache_hook.add_partial("generate_until", requests[index].args,
                                                texts[index])
        return texts

    # --- the steps, on every process ------------------------------------------------------

    def _score(self, pieces: list[Piece], greedy: bool) -> list[tuple[float, bool]]:
        """``(sum of scored log-probabilities, every scored target greedy)`` of each piece."""
        batch, spans = pack_rows(pieces, self.max_length, self.run.tokenizer.pad_id,
                                 self.prefix_alone, self.run.model_config.document_bound())
        total = -(-len(batch["inputs"]) // self.rows) * self.rows
        batch = {name: np.pad(rows, ((0, total - len(rows)), (0, 0)))
                 for name, rows in batch.items()}
        logprob = np.zeros(batch["inputs"].shape, np.float32)
        is_greedy = np.ones(batch["inputs"].shape, bool)
        command = _SCORE_GREEDY if greedy else _SCORE
        for start in range(0, total, self.rows):
            step = slice(start, start + self.rows)
            scores = self._step(command, {name: rows[step] for name, rows in batch.items()})
            logprob[step] = scores["logprob"]
            if greedy:
                is_greedy[step] = scores["greedy"]
        return [(float(logprob[row, a:b].sum(dtype=np.float64)), bool(is_greedy[row, a:b].all()))
                for row, a, b in spans]

    def _step(self, command: int, arrays: dict[str, np.ndarray], new_tokens: int = 0):
        """Runs one step on every process: process 0 announces it (`_announce`) and `follow`
        runs it elsewhere. Returns the step's results as numpy."""
        if jax.process_count() > 1 and jax.process_index() == 0:
            self._announce(command, arrays, new_tokens)
        if command == _GENERATE:
            tokens, lengths = generate(self.run.params, jnp.asarray(arrays["prompts"]),
                                       jax.random.PRNGKey(0), config=self.run.model_config,
                                       max_new_tokens=new_tokens, temperature=0.0,
                                       end_token=self.eot_token_id)
            return np.asarray(tokens), np.asarray(lengths)
        batch = sharding.to_global_batch(arrays, self._batch_sharding, self._process_rows)
        scores = {name: _local_rows(x)
                  for name, x in self._steps[command](self.run.params, batch).items()}
        if jax.process_count() == 1:
            return scores
        # Each process's rows of the results to process 0, through the key-value store too.
        client, key = _coordination_client(), f"harness/scores/{self._announced - 1}"
        start = self._process_rows.start
        if jax.process_index():
            data = io.BytesIO()
            np.savez(data, _start=np.array(start), **scores)
            client.key_value_set_bytes(f"{key}/{jax.process_index()}", data.getvalue())
            return None
        whole = {name: np.zeros((self.rows, *x.shape[1:]), x.dtype) for name, x in scores.items()}
        for process in range(jax.process_count()):
            if process:
                with np.load(io.BytesIO(client.blocking_key_value_get_bytes(
                        f"{key}/{process}", _WAIT_MS))) as stored:
                    start, scores = int(stored["_start"]), {n: stored[n] for n in whole}
                client.key_value_delete(f"{key}/{process}")
            for name, rows in scores.items():
                whole[name][start:start + len(rows)] = rows
        return whole

    def follow(self) -> None:
        """A process other than 0: runs the steps process 0 announces until it says stop."""
        while True:
            data = _coordination_client().blocking_key_value_get_bytes(
                f"harness/step/{self._announced}", _WAIT_MS)
            self._announced += 1
            with np.load(io.BytesIO(data)) as stored:
                arrays = {name: stored[name] for name in stored.files}
            command, new_tokens = (int(x) for x in arrays.pop("_header"))
            if command == _STOP:
                return
            self._step(command, arrays, new_tokens)

    def stop_followers(self) -> None:
        """Process 0, after the harness: the other processes' `follow` returns."""
        if jax.process_count() > 1:
            self._announce(_STOP, {})

    def _announce(self, command: int, arrays: dict[str, np.ndarray], new_tokens: int = 0) -> None:
        """Process 0: the next step (``command``, its inputs ``arrays`` and a generation's
        ``new_tokens``) for `follow`, through the coordination service's key-value store, not
        a collective: the others wait for it while the harness builds its tasks, minutes at
        times, and gloo gives up on a collective that a peer joins 30 s late (a broadcast of
        the inputs hung besides, under jax 0.12.1). The previous step's key goes: every
        process has read it, since that step's collectives needed them all."""
        client = _coordination_client()
        if self._announced:
            client.key_value_delete(f"harness/step/{self._announced - 1}")
        data = io.BytesIO()
        np.savez_compressed(data, _header=np.array([command, new_tokens]), **arrays)
        client.key_value_set_bytes(f"harness/step/{self._announced}", data.getvalue())
        self._announced += 1


def _coordination_client():
    """JAX's coordination service client (launch.py's key-value store; no public API)."""
    from jax._src import distributed

    return distributed.global_state.client


def evaluate_tasks(lm: RunLM, tasks: list[str], include_path: str | None = None,
                   limit: float | None = None, metadata: dict | None = None) -> dict:
    """``lm_eval.simple_evaluate`` of ``lm`` on ``tasks`` (process 0; the other processes run
    `RunLM.follow` meanwhile and return once it ends), with the run's tokenizer as
    ``metadata["tokenizer"]`` unless ``metadata`` names one. Returns lm-eval's results dict.
    Raises a one-line `UserError` for a task name that neither ``include_path`` nor lm-eval
    knows."""
    try:
        with tempfile.TemporaryDirectory() as folder:
            metadata = dict(metadata or {})
            if "tokenizer" not in metadata:
                export_tokenizer(lm.run.tokenizer, folder, lm.max_length)
                metadata["tokenizer"] = folder
            manager = task_manager(tasks, include_path, metadata)
            return lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit,
                                           task_manager=manager)
    finally:
        lm.stop_followers()


# lm-eval's wikitext metrics, with their aggregations (stated: lm-eval warns where a YAML
# leaves them to its defaults).
_PERPLEXITY_METRICS = "".join(
    f"  - metric: {metric}\n    aggregation: {aggregation}\n    higher_is_better: false\n"
    for metric, aggregation in (("word_perplexity", "weighted_perplexity"),
                                ("byte_perplexity", "weighted_perplexity"),
                                ("bits_per_byte", "bits_per_byte")))


def write_perplexity_task(folder: str, name: str, documents: list[str]) -> None:
    """A perplexity task ``name`` over ``documents`` in ``folder`` (for ``--include_path``):
    ``name.jsonl`` (one ``{"text": document}`` a line) and ``name.yaml``, a
    ``loglikelihood_rolling`` task on that file with lm-eval's ``word_perplexity``,
    ``byte_perplexity`` and ``bits_per_byte`` (its wikitext task's metrics). Offline."""
    data = os.path.join(os.path.abspath(folder), f"{name}.jsonl")
    with open(data, "w", encoding="utf-8") as f:
        for document in documents:
            f.write(json.dumps({"text": document}) + "\n")
    with open(os.path.join(folder, f"{name}.yaml"), "w", encoding="utf-8") as f:
        f.write(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                f"    test: {json.dumps(data)}\ntest_split: test\n"
                f"output_type: loglikelihood_rolling\ndoc_to_text: ''\n"
                f"doc_to_target: '{{{{text}}}}'\nmetric_list:\n{_PERPLEXITY_METRICS}"
                f"metadata:\n  version: 1.0\n")


def check_task_flags(tasks: list[str], include_path: str | None) -> None:
    """A one-line `UserError` for an empty ``tasks`` or an ``include_path`` that is not a
    folder: what can be checked before a run is restored."""
    if not tasks:
        raise UserError("--tasks is empty: expected lm-eval task names, comma-separated")
    if include_path is not None and not os.path.isdir(include_path):
        raise UserError(f"--include_path={include_path!r}: not a folder")


def task_manager(tasks: list[str], include_path: str | None,
                 metadata: dict | None = None) -> TaskManager:
    """lm-eval's index of ``tasks`` with ``metadata``: ``include_path``'s tasks alone where
    they are all of ``tasks`` (indexing lm-eval's own 15,000 takes tens of seconds), else with
    lm-eval's. A one-line `UserError` for a name neither knows (`check_task_flags`' too)."""
    check_task_flags(tasks, include_path)
    if include_path is not None:
        manager = TaskManager(include_path=include_path, include_defaults=False,
                              metadata=metadata)
        if all(task in manager.all_tasks for task in tasks):
            return manager
    manager = TaskManager(include_path=include_path, metadata=metadata)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise UserError(f"--tasks: unknown task {unknown[0]!r} (lm-eval's names, or a YAML's "
                        f"'task' in --include_path)")
    return manager


def _metadata(text: str | None) -> dict:
    try:
        metadata = json.loads(text) if text else {}
    except json.JSONDecodeError as error:
        raise UserError(f"--metadata={text!r}: not JSON ({error.msg})") from None
    if not isinstance(metadata, dict):
        raise UserError(f"--metadata={text!r}: expected a JSON object")
    return metadata


def main(argv) -> None:
    del argv  # cli.parse_flags admits none
    logging.set_verbosity(logging.ERROR)  # orbax warns that a read-only manager is read-only
    cli.check_output_file("output", FLAGS.output)
    if FLAGS.max_length < 0:
        raise UserError(f"--max_length={FLAGS.max_length}: expected a positive int (0: the "
                        f"training seq_len)")
    if FLAGS.batch_tokens < 1:
        raise UserError(f"--batch_tokens={FLAGS.batch_tokens}: expected a positive int")
    if FLAGS.limit is not None and not FLAGS.limit > 0:
        raise UserError(f"--limit={FLAGS.limit}: expected a count >= 1 or a fraction in (0, 1)")
    metadata = _metadata(FLAGS.metadata)
    check_task_flags(FLAGS.tasks, FLAGS.include_path)
    launch.start_distributed()
    run = inference.load_for_inference(FLAGS.workdir, step=FLAGS.step)
    lm = RunLM(run, FLAGS.max_length, FLAGS.batch_tokens)
    if jax.process_index() != 0:
        lm.follow()
        return
    limit = int(FLAGS.limit) if FLAGS.limit and FLAGS.limit >= 1 else FLAGS.limit
    results = evaluate_tasks(lm, FLAGS.tasks, FLAGS.include_path, limit, metadata)
    print(make_table(results))
    summary = {key: results[key] for key in ("results", "versions", "n-samples")
               if key in results} | {"step": run.step, "max_length": lm.max_length}
    print(json.dumps(summary, indent=1, default=str))
    if FLAGS.output:
        with open(FLAGS.output, "w") as f:
            json.dump(summary, f, indent=1, default=str)


def define_flags() -> None:
    """The script's flags, defined when it runs: tests import this module beside
    evaluate_run.py, whose flags have the same names."""
    flags.DEFINE_string("workdir", None, "The training run's workdir.", required=True)
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    flags.DEFINE_list("tasks", [], "lm-eval task or group names, comma-separated.")
    flags.DEFINE_string("include_path", None, "A folder of extra task YAMLs (e.g. a local "
                        "perplexity task).")
    flags.DEFINE_float("limit", None, "At most this many documents per task (below 1: a "
                       "fraction).")
    flags.DEFINE_integer("max_length", 0, "Tokens per window, row and prompt + generation (0: the "
                         "training seq_len); may be far beyond it.")
    flags.DEFINE_integer("batch_tokens", 16384, "Tokens per scoring step (rows of max_length, at "
                         "least one per device) and per generation batch.")
    flags.DEFINE_string("metadata", None, "JSON object for the tasks' metadata, e.g. RULER's "
                        "{\"max_seq_lengths\": [4096]} (\"tokenizer\" defaults to the run's).")
    flags.DEFINE_string("output", None, "Also write the results to this JSON file.")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
