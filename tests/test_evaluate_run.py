"""evaluate_run.py and generate.py on a tiny trained run: the reported loss equals a direct
computation with dense attention; every token counts once at any context; the CLIs work."""

import glob
import json
import math
import os

import jax
import numpy as np
import optax
import pytest

import evaluate_run
import train
from data import make_tokenizer, packed_examples
from data.pipeline import split_tokens
from model import TransformerConfig, TransformerLM
from tests.training import (ROOT, SHARED_STEPS, count_restored_arrays, restore_params, script,
                            tiny_config)

# End-to-end (the scripts run as processes, trained runs): out of the quick tier.
pytestmark = pytest.mark.slow


@pytest.fixture
def run(trained):
    """The shared tiny run (tests/conftest.py): its config and workdir."""
    return trained["config"], str(trained["run"])


def _direct_loss(config, workdir, seq_len):
    """Sum of losses, tokens and bytes over every validation example, with dense attention
    (jax.nn.dot_product_attention) in place of the blocked kernel, in batches of `_ROWS`
    examples (rows are independent: the batch changes no row's logits)."""
    params = restore_params(workdir)
    tokenizer = make_tokenizer(config.data)
    dense = TransformerConfig.from_config(config.model.to_dict(), vocab_size=tokenizer.vocab_size,
                                          attention_implementation="dense")
    examples = packed_examples(config.data, "validation", tokenizer, seq_len)
    apply = jax.jit(lambda x: optax.softmax_cross_entropy_with_integer_labels(
        TransformerLM(dense).apply({"params": params}, x["inputs"], segment_ids=x["segment_ids"],
                                   positions=x["positions"]), x["targets"]))
    loss = tokens = num_bytes = 0.0
    for start in range(0, len(examples), _ROWS):
        rows = [examples[i] for i in range(start, min(start + _ROWS, len(examples)))]
        batch = {k: np.stack([row[k] for row in rows]) for k in rows[0]}
        mask = batch["loss_mask"]
        padded = {k: np.pad(v, ((0, _ROWS - len(rows)), (0, 0))) for k, v in batch.items()}
        loss += float((np.asarray(apply(padded))[:len(rows)] * mask).sum())
        tokens += float(mask.sum())
        num_bytes += float(((batch["targets"] < 256) * mask).sum())
    return loss, tokens, num_bytes


_ROWS = 64


def test_a_run_loads_for_inference_with_its_parameters_alone(run, monkeypatch):
    """evaluate_run.py, generate.py and export.py (inference.load_for_inference) read the
    parameters, not the optimizer's moments (twice their size) nor anything else."""
    import inference

    _, workdir = run
    counts = count_restored_arrays(monkeypatch)
    loaded = inference.load_for_inference(workdir)
    assert sum(counts) == len(jax.tree.leaves(loaded.params)) > 0


def test_evaluate_matches_a_direct_computation(run):
    config, workdir = run
    result = evaluate_run.evaluate(workdir)
    loss, tokens, num_bytes = _direct_loss(config, workdir, config.seq_len)
    assert result["num_tokens"] == tokens
    assert result["loss"] == pytest.approx(loss / tokens, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(loss / tokens), rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(loss / math.log(2) / num_bytes, rel=1e-5)


def test_longer_contexts_count_every_token_once_and_do_not_hurt(run):
    config, workdir = run
    short = evaluate_run.evaluate(workdir)
    longer = evaluate_run.evaluate(workdir, seq_len=4 * config.seq_len)
    assert longer["num_tokens"] == short["num_tokens"]
    # Fewer cuts, so fewer tokens start without context; the window keeps the cost linear.
    assert longer["loss"] <= short["loss"] + 1e-3
    limited = evaluate_run.evaluate(workdir, max_tokens=1000)
    assert 1000 <= limited["num_tokens"] < short["num_tokens"]
    # It stops at the batch that reaches the limit.
    assert limited["num_tokens"] - config.batch_size * config.seq_len < 1000


def test_context_parallel_evaluation_matches_a_direct_computation(run):
    # 4x the training context split over 8 devices (32 positions each, window 16): no device
    # holds a whole sequence.
    config, workdir = run
    result = evaluate_run.evaluate(workdir, seq_len=256, overrides={"mesh.context": 8})
    loss, tokens, _ = _direct_loss(config, workdir, 256)
    assert result["num_tokens"] == tokens
    assert result["loss"] == pytest.approx(loss / tokens, rel=1e-5)


def test_the_cli_prints_and_writes_json_and_a_plot(run, tmp_path):
    config, workdir = run
    output, plot = tmp_path / "eval.json", tmp_path / "loss.png"
    done = script("evaluate_run.py", f"--workdir={workdir}", "--seq_len=128", f"--output={output}",
                  f"--plot={plot}")
    assert done.returncode == 0, done.stderr[-2000:]
    written = json.loads(output.read_text())
    assert {"loss", "perplexity", "bits_per_byte", "num_tokens"} <= set(written)
    assert written["seq_len"] == 128 and json.loads(done.stdout) == written
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Another corpus through --config.data.*: a text file, as the README says (held-out text
    # alone: data.paths, the training text, is not needed).
    text = tmp_path / "other.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 50)
    done = script("evaluate_run.py", f"--workdir={workdir}", "--config.data.source=text",
                  f"--config.data.validation_paths={text}",
                  f"--config.data.cache_dir={tmp_path}/cache")
    assert done.returncode == 0, done.stderr[-2000:]
    # Every byte and the end of document is a target, except the first byte (nothing before it).
    assert json.loads(done.stdout)["num_tokens"] == len(text.read_bytes())


def test_evaluate_errors_are_one_line(run, tmp_path):
    _, workdir = run
    for args, message in (
            ([f"--workdir={tmp_path}"], f"error: --workdir='{tmp_path}' has no checkpoints"),
            ([f"--workdir={workdir}", "--step=7"], "error: step=7: no checkpoint for it"),
            ([f"--workdir={workdir}", "--config.seq_len=4"], "error: --config.seq_len: "
                                                             "evaluate_run.py takes only"),
            ([f"--workdir={workdir}", "--config.mesh.context=8", "--seq_len=100"],
             "error: seq_len=100 is not divisible by mesh.context=8"),
            # Paths to write are checked before the work, not after it.
            ([f"--workdir={workdir}", f"--output={tmp_path}"], "error: --output="),
            ([f"--workdir={workdir}", f"--plot={tmp_path}"], "error: --plot="),
            ([f"--workdir={workdir}", "--plot=/proc/none/loss.png"],
             "error: --plot='/proc/none/loss.png': the folder /proc/none does not exist"),
            ([f"--workdir={workdir}", "--config=configs/tiny.py"],
             "error: --config=configs/tiny.py: evaluate_run.py evaluates with the run's saved "
             "config"),
            ([f"--workdir={workdir}", "--probe_plot=pk.png"],
             "error: --probe_plot='pk.png' needs --probe=passkey"),
            ([f"--workdir={workdir}", "--probe=passkey", "--probe_trials=0"],
             "error: --probe_trials=0: expected an int >= 1"),
            ([f"--workdir={workdir}", "--plot=loss.xyz"],
             "error: --plot='loss.xyz': expected a file name ending in one of "),
            ([f"--workdir={workdir}", "--config.batch_size=0"],
             "error: batch_size=0: expected an int >= 1"),
            ([f"--workdir={workdir}", "--config.data.validation_fraction=nan"],
             "error: --config.data.validation_fraction=nan: expected a finite number")):
        done = script("evaluate_run.py", *args)
        assert done.returncode == 1 and "Traceback" not in done.stderr
        assert done.stderr.strip().splitlines()[-1].startswith(message), done.stderr[-500:]


def test_generate_cli_is_seeded(run):
    _, workdir = run
    args = [f"--workdir={workdir}", "--prompt=import ", "--max_new_tokens=24", "--seed=3"]
    first, second = script("generate.py", *args), script("generate.py", *args)
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout == second.stdout
    assert f"--- sample 1 of 1 (step {SHARED_STEPS}) ---\nimport " in first.stdout
    other = script("generate.py", *args[:-1], "--seed=4", "--temperature=1.5")
    assert other.stdout != first.stdout
    for flag, message in (("--top_p=0", "error: --top_p=0.0: expected a probability in (0, 1]"),
                          ("--temperature=nan", "error: --temperature=nan: expected a finite"),
                          ("--seed=9223372036854775808", "error: --seed=9223372036854775808"),
                          ("--top_k=-1", "error: --top_k=-1: expected an int >= 0"),
                          ("--num_samples=0", "error: --num_samples=0: expected an int >= 1"),
                          ("--max_new_tokens=1000000000000",
                           "error: --max_new_tokens=1000000000000: expected fewer than")):
        bad = script("generate.py", f"--workdir={workdir}", flag)
        assert bad.returncode == 1 and "Traceback" not in bad.stderr
        assert bad.stderr.strip().splitlines()[-1].startswith(message), bad.stderr[-500:]


def test_loss_bands_and_the_passkey_probe_end_to_end(run, tmp_path):
    """The JSON's loss by distance band adds up to the loss and the tokens; --probe=passkey
    prints the tables and writes ranking accuracy and exact copies per distance and per band,
    and a PNG."""
    _, workdir = run
    output, plot = tmp_path / "eval.json", tmp_path / "passkey.png"
    done = script("evaluate_run.py", f"--workdir={workdir}", "--seq_len=128", f"--output={output}",
                  "--probe=passkey", "--probe_trials=3", "--probe_distances=4,40",
                  f"--probe_plot={plot}")
    assert done.returncode == 0, done.stderr[-2000:]
    written = json.loads(output.read_text())
    bands = written["loss_by_distance_band"]
    assert [b["band"] for b in bands] == ["0-W", "W-LW", ">LW"]
    assert [(b["start"], b["end"]) for b in bands] == [(0, 16), (16, 32), (32, None)]
    assert sum(b["tokens"] for b in bands) == written["num_tokens"]
    assert sum(b["loss"] * b["tokens"] for b in bands) / written["num_tokens"] == \
        pytest.approx(written["loss"], rel=1e-5)
    assert [r["distance"] for r in written["passkey"]] == [4, 40]
    # Bytes: ". remember it. " and the question lie between the key and the question's end too.
    assert [r["key_distance"] for r in written["passkey"]] == [4 + 54, 40 + 54]
    assert all(r["trials"] == 3 and r["accuracy"] in (0, 1 / 3, 2 / 3, 1)
               and r["exact_copies"] in (0, 1 / 3, 2 / 3, 1) and r["chance"] == 1 / 8
               and len(r["digit_accuracy_by_position"]) == 5 for r in written["passkey"])
    # W = 16, L·W = 32: both keys lie beyond the local reach.
    assert [(b["band"], b["key_distances"], b["trials"]) for b in written["passkey_bands"]] == \
        [("beyond L·W", [58, 94], 6)]
    assert "distance  key distance  band        ranking  exact copies  digits" in done.stderr
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    done = script("evaluate_run.py", f"--workdir={workdir}", "--probe=passkey",
                  "--probe_distances=4,x")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("error: --probe_distances=4,x")


def test_a_sentencepiece_run_scores_any_text_with_its_own_tokenizer(tmp_path):
    """The tokenizer comes from the run as trained: another corpus is scored with it, not
    refused because the SentencePiece model was trained on other text."""
    config = tiny_config(tmp_path / "cache", num_train_steps=4, eval_every_steps=0,
                         sample_tokens=0, **{"data.max_documents": 12,
                                             "data.tokenizer": "sentencepiece",
                                             "data.sentencepiece_vocab_size": 400})
    train.train_and_evaluate(config, str(tmp_path / "run"))
    text = tmp_path / "some_file.py"  # one file: its last 2% is the validation split
    text.write_text("".join(open(p).read() for p in sorted(glob.glob(f"{ROOT}/data/*.py"))))
    done = script("evaluate_run.py", f"--workdir={tmp_path / 'run'}", "--config.data.source=text",
                  f"--config.data.paths={text}", f"--config.data.cache_dir={tmp_path}/cache")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["num_tokens"] > 0
    # Its SentencePiece model gone, the run is not re-tokenized with a new one: one line.
    os.remove(tmp_path / "run" / "sentencepiece.model")
    done = script("evaluate_run.py", f"--workdir={tmp_path / 'run'}")
    assert done.returncode == 1 and done.stderr.strip() == (
        f"error: {tmp_path / 'run' / 'sentencepiece.model'} is missing: the tokenizer this run "
        f"trained with (put it back; the checkpoints' ids mean its pieces)")
    assert not os.path.exists(tmp_path / "run" / "sentencepiece.model")


def test_evaluate_the_train_split_and_generate_with_its_flags(run):
    config, workdir = run
    # Rows of 512 tokens, 32 a batch: the split's million tokens in 64 batches, not 2,000.
    done = script("evaluate_run.py", f"--workdir={workdir}", "--split=train", "--seq_len=512",
                  "--config.batch_size=32")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    train_tokens = split_tokens(config.data, "train", make_tokenizer(config.data))
    assert result["split"] == "train" and result["num_tokens"] == train_tokens.size - 1

    def generate(*flags):
        done = script("generate.py", f"--workdir={workdir}", "--prompt=import ",
                      "--max_new_tokens=16", *flags)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    # top_k=1 samples the likeliest token: greedy decoding, whatever the temperature.
    assert generate("--top_k=1", "--temperature=2.0", "--top_p=1") == generate("--temperature=0")
    two = generate("--step=75", "--num_samples=2", "--seed=1", "--temperature=1.5")
    assert "--- sample 1 of 2 (step 75) ---" in two and "--- sample 2 of 2 (step 75) ---" in two
    first, second = (part.split("---\n", 1)[1] for part in two.split("--- sample")[1:])
    assert first != second  # seeds 1 and 2


def test_a_run_saved_before_newer_fields_still_evaluates(run, tmp_path):
    """A checkpoint's config from before the passkey fields and the document separator (older
    code): loading it reads only what it has, the rest at their defaults."""
    import shutil

    _, workdir = run
    old = tmp_path / "old"
    shutil.copytree(workdir, old)
    for path in glob.glob(f"{old}/checkpoints/*/config/metadata"):
        saved = json.loads(open(path).read())
        for name in ("passkey_fraction", "passkey_questions", "passkey_answer_weight",
                     "document_separator"):
            del saved["data"][name]
        with open(path, "w") as f:
            json.dump(saved, f)
    result = evaluate_run.evaluate(str(old), max_tokens=256)
    assert result["num_tokens"] >= 256 and math.isfinite(result["loss"])
