"""harness.py: lm-evaluation-harness over a run's own tokenizer and parameters, on the shared
tiny run, offline.

Checked against independent references: the rolling bits per byte against evaluate_run.py's on
the same documents (docs/evaluation.md's formula for the gap, to 1e-6); each packed
``loglikelihood`` against a full forward pass of its request alone; ``generate_until`` against
generate.py's greedy text; RULER's needle tasks against the same greedy decoding; Hugging
Face's ``evaluate`` package imported from the repository root (evaluate_run.py's name); two
processes against one.
"""

from __future__ import annotations

import importlib.machinery
import json
import math
import os
import sys

import jax
import numpy as np
import pytest

import evaluate_run
import harness
import inference
import steps
from data import sources
from data.packing import PackedExamples
from data.pipeline import split_tokens
from model import TransformerLM
from tests.test_multiprocess import finish, launch_processes
from tests.training import ROOT, script

# Rows, windows and prompt + generation: the two shortest validation documents fit one rolling
# window each, and RULER's 1024-token prompts with their 128 new tokens fit.
MAX_LENGTH = 1280


@pytest.fixture(scope="module")
def lm(trained):
    return harness.RunLM(inference.load_for_inference(str(trained["run"])), MAX_LENGTH)


@pytest.fixture(scope="module")
def documents(trained):
    """The validation split's two shortest documents (about 1,100 bytes each)."""
    shortest = sorted(sources.read_documents(trained["config"].data, "validation"), key=len)[:2]
    assert max(len(d.encode("utf-8")) for d in shortest) < MAX_LENGTH  # bytes: one token each
    return shortest


def _requests(kind: str, arguments: list[tuple]) -> list:
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, args, index) for index, args in enumerate(arguments)]


def _forward(run, inputs, segment_ids=None, positions=None, length=None) -> np.ndarray:
    """Log-probabilities ``(len(inputs), vocab)`` of one row by a full forward pass, the row
    padded to ``length`` (default its own) after its tokens: causal attention, so the padding
    changes none of their predictions, and rows of one length compile once."""
    pad = (length or len(inputs)) - len(inputs)
    row = lambda x, fill: np.pad(np.asarray(x), (0, pad), constant_values=fill)[None]  # noqa: E731
    logits = TransformerLM(run.model_config).apply(
        {"params": run.params}, row(inputs, run.tokenizer.pad_id),
        segment_ids=None if segment_ids is None else row(segment_ids, 0),
        positions=None if positions is None else row(positions, 0))
    return np.asarray(jax.nn.log_softmax(logits[0, :len(inputs)]), np.float64)


def test_rolling_bits_per_byte_is_evaluate_runs_within_the_documented_gap(trained, lm, documents,
                                                                          tmp_path):
    """docs/evaluation.md's formula: the harness's nats are evaluate_run.py's less the
    end-of-document losses and the first tokens scored across a document boundary, plus the
    first tokens scored after the prefix alone; over the documents' raw UTF-8 bytes."""
    harness.write_perplexity_task(str(tmp_path), "short_validation", documents)
    results = harness.evaluate_tasks(lm, ["short_validation"], str(tmp_path))
    got = results["results"]["short_validation"]["bits_per_byte,none"]

    folder = tmp_path / "documents"
    folder.mkdir()
    for index, document in enumerate(documents):
        (folder / f"{index}.txt").write_text(document)
    run = inference.load_for_inference(str(trained["run"]), {
        "data.source": "text", "data.validation_paths": str(folder),
        "data.cache_dir": str(tmp_path / "cache")})
    eod = run.tokenizer.end_of_document_id
    stream = split_tokens(run.config.data, "validation", run.tokenizer)
    seq_len = stream.size - 1  # one row: no document is cut
    evaluated = evaluate_run.evaluate_run(run, seq_len=seq_len)

    # The gap's terms, by full forward passes: evaluate_run.py's row, and the prefix alone.
    row = PackedExamples(stream, seq_len, eod, run.tokenizer.pad_id, isolate_documents=True)[0]
    losses = np.asarray(steps.token_losses(TransformerLM(run.model_config), run.params,
                                           {k: v[None] for k, v in row.items()})[0], np.float64)
    real = row["loss_mask"] > 0
    first_tokens = np.concatenate([stream[:1], stream[1:][stream[:-1] == eod]])
    after_prefix = -_forward(run, [eod])[0, first_tokens].sum()
    nats = (evaluated["loss"] * evaluated["num_tokens"] - losses[real & (row["targets"] == eod)]
            .sum() - losses[real & (row["inputs"] == eod)].sum() + after_prefix)
    raw_bytes = sum(len(document.encode("utf-8")) for document in documents)
    assert len(first_tokens) == len(documents)
    assert abs(got - evaluated["bits_per_byte"]) > 1e-3  # the gap is real
    assert got == pytest.approx(nats / math.log(2) / raw_bytes, abs=1e-6)


def test_loglikelihood_is_full_forward_passes_of_each_request_alone(lm, documents):
    """Packed requests (all in one row here) score as each alone: the continuation's
    log-probability and greedy flag, lm-eval's encoding (trailing spaces of the context move to
    the continuation; an empty context is the prefix token, a segment of its own)."""
    text = documents[0]
    pairs = [(text[:start], text[start:start + size])
             for start, size in ((40, 12), (300, 1), (500, 200))]
    pairs += [("", text[:30]), (text[:17] + "  ", "x = 1")]
    results = lm.loglikelihood(_requests("loglikelihood", pairs))
    assert sum(len(c) + len(x) + 1 for c, x in pairs) < MAX_LENGTH  # so one row holds them

    run, eod = lm.run, lm.eot_token_id
    for (context, continuation), (logprob, greedy) in zip(pairs, results, strict=True):
        spaces = len(context) - len(context.rstrip())
        context, continuation = context[:len(context) - spaces], context[len(context) - spaces:] \
            + continuation
        scored = list(run.tokenizer.encode(continuation))
        if context:
            tokens = list(run.tokenizer.encode(context)) + scored
            log_probs = _forward(run, tokens[:-1], length=MAX_LENGTH)
        else:  # the prefix token alone, then the continuation from position 0
            tokens = [eod] + scored
            n = len(scored)
            log_probs = _forward(run, tokens[:-1], [1] + [2] * (n - 1), [0] + list(range(n - 1)),
                                 MAX_LENGTH)
        rows = np.arange(len(tokens) - 1 - len(scored), len(tokens) - 1)
        assert logprob == pytest.approx(log_probs[rows, scored].sum(), rel=1e-5, abs=1e-5)
        assert greedy == bool((log_probs[rows].argmax(-1) == scored).all())


def test_generate_until_is_generate_pys_greedy_text(trained, lm, documents):
    """The same greedy text as generate.py --temperature=0; a stop string cuts it where
    lm-eval's backends cut it."""
    prompt = documents[1][:200]
    # Ours first: generate.py with the same settings (--top_p=1) reads its compiled program
    # from the suite's persistent compilation cache.
    alone = lm.generate_until(_requests("generate_until", [
        (prompt, {"until": [], "max_gen_toks": 40, "do_sample": False})]))[0]
    done = script("generate.py", f"--workdir={trained['run']}", f"--prompt={prompt}",
                  "--max_new_tokens=40", "--temperature=0", "--top_p=1")
    assert done.returncode == 0, done.stderr[-2000:]
    expected = done.stdout.split("---\n", 1)[1][len(prompt):-1]  # less print's newline
    assert alone == expected
    stop = expected[10:13]
    cut = lm.generate_until(_requests("generate_until", [
        (prompt, {"until": [stop], "max_gen_toks": 40, "do_sample": False})]))[0]
    assert cut == expected.split(stop)[0]


@pytest.mark.slow  # RULER builds its 500 samples per length whatever the limit
def test_ruler_needles_at_1024_tokens_of_the_runs_tokenizer(lm):
    """niah_single_1 and niah_multikey_2 at 1024 tokens, their text sized by the run's own
    tokenizer (exported to a folder for them): each prompt fits 1024 of our tokens, and each
    answer is the greedy decoding of its prompt alone."""
    tasks = ["niah_single_1", "niah_multikey_2"]
    ruler = os.path.join(os.path.dirname(sys.modules["lm_eval"].__file__), "tasks", "ruler")
    results = harness.evaluate_tasks(lm, tasks, ruler, limit=2,  # indexes RULER's tasks alone
                                     metadata={"max_seq_lengths": [1024]})
    for task in tasks:
        assert results["results"][task]["1024,none"] >= 0
        samples = results["samples"][task]
        assert len(samples) == 2
        for sample in samples:
            prompt, gen_kwargs = sample["arguments"][0]
            assert 512 < len(lm.tok_encode(prompt)) <= 1024 - gen_kwargs["max_gen_toks"]
            alone = lm.generate_until(_requests("generate_until", [(prompt, gen_kwargs)]))
            assert sample["resps"][0][0] == alone[0]


def test_hugging_faces_evaluate_loads_from_the_repository_root():
    """A module named evaluate at the repository root (where every script and pytest put
    ``sys.path[0]``) would shadow Hugging Face's evaluate package, which lm-eval tasks import:
    the name resolves to the package, and a task whose code imports it loads."""
    from lm_eval.tasks._yaml_loader import load_yaml

    spec = importlib.machinery.PathFinder.find_spec("evaluate", [ROOT] + sys.path)
    assert "site-packages" in spec.origin, spec.origin
    task = os.path.join(os.path.dirname(sys.modules["lm_eval"].__file__), "tasks", "noticia",
                        "noticia.yaml")
    rouge = load_yaml(task)["metric_list"][0]["metric"]  # utils.py: `import evaluate` at the top
    assert hasattr(sys.modules[rouge.__module__].evaluate, "load")


def test_bad_flags_are_one_line_errors(trained, tmp_path):
    done = script("harness.py", f"--workdir={trained['run']}", "--tasks=niah_single_1",
                  "--max_length=-1")
    assert done.returncode == 1 and done.stderr.strip() == (
        "error: --max_length=-1: expected a positive int (0: the training seq_len)"), done.stderr
    for check, message in (
            (lambda: harness.check_task_flags([], None), "--tasks is empty"),
            (lambda: harness.check_task_flags(["x"], str(tmp_path / "none")), "--include_path="),
            (lambda: harness._metadata("[1]"), "expected a JSON object"),
            (lambda: harness._metadata("{"), "not JSON")):
        with pytest.raises(harness.UserError, match=message):
            check()


@pytest.mark.slow
def test_two_processes_score_as_one(trained, lm, documents, tmp_path):
    """harness.py in two processes (process 0 runs the harness, the other follows its steps)
    gives the in-process adapter's scores (a perplexity task: packed rolling windows)."""
    harness.write_perplexity_task(str(tmp_path), "short_validation", documents[:2])
    output = tmp_path / "results.json"
    processes = launch_processes(
        ["harness.py", f"--workdir={trained['run']}", "--tasks=short_validation",
         f"--include_path={tmp_path}", f"--max_length={MAX_LENGTH}", f"--output={output}"], 2,
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    finish(processes)
    expected = harness.evaluate_tasks(lm, ["short_validation"], str(tmp_path))
    got = json.loads(output.read_text())["results"]["short_validation"]
    for metric in ("bits_per_byte,none", "byte_perplexity,none", "word_perplexity,none"):
        assert got[metric] == pytest.approx(expected["results"]["short_validation"][metric],
                                            rel=1e-6)


def test_a_tokenizer_with_a_bos_begins_every_request_with_it(lm):
    """An imported model's BOS (Gemma's, data/tokenizers.py's ``begin_of_document_id``), as
    lm-eval's ``hf`` backend with transformers' tokenizer: before a context, as the empty
    context and as the rolling windows' prefix (the document's own first token: its segment),
    never scored itself."""

    from data.tokenizers import ByteTokenizer

    class WithBos(ByteTokenizer):
        begin_of_document_id = 300  # an id of the model's vocabulary that is no byte

    bos_lm = harness.RunLM(lm.run._replace(tokenizer=WithBos()), MAX_LENGTH)
    assert bos_lm.prefix_token_id == 300 and not bos_lm.prefix_alone
    assert bos_lm.tok_encode("ab") == [300, 97, 98]
    assert bos_lm.tok_encode("ab", add_special_tokens=False) == [97, 98]
    text = "def f(x):\n    return x\n"
    log_probs = _forward(lm.run, [300, *map(ord, text[:-1])], length=MAX_LENGTH)
    expected = log_probs[np.arange(len(text)), [ord(c) for c in text]]
    (empty, _), (context, _) = bos_lm.loglikelihood(_requests(
        "loglikelihood", [("", text), (text[:9], text[9:])]))
    assert empty == pytest.approx(expected.sum(), rel=1e-5)
    assert context == pytest.approx(expected[9:].sum(), rel=1e-5)
    [rolling] = bos_lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]))
    assert rolling == pytest.approx(expected.sum(), rel=1e-5)
