"""train.py: the tiny config learns; SIGTERM saves; the bad input is one line and loses
nothing. (The step itself: tests/test_steps.py; resume after SIGKILL is bit-identical:
tests/test_init_from.py.)"""

import glob
import json
import os
import re
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

import train
from checkpoints import Checkpoints
from tests.training import (ROOT, SHARED_STEPS, config_flags, restore_params, script,
                            tiny_config, train_metrics)

# End-to-end (the scripts run as processes, trained runs): out of the quick tier.
pytestmark = pytest.mark.slow


def test_tiny_config_trains_and_its_loss_falls(trained):
    workdir = trained["run"]
    metrics = train_metrics(workdir)
    steps = sorted(metrics)
    assert steps == list(range(1, SHARED_STEPS + 1))
    first = np.mean([metrics[s]["loss"] for s in steps[:3]])
    last = np.mean([metrics[s]["loss"] for s in steps[-3:]])
    assert last < first - 1.5, (first, last)  # from ~ln(384) = 5.95 towards ~3
    assert trained["result"]["loss"] < 4.0 and trained["result"]["bits_per_byte"] < 6.0
    # keep_checkpoints = 3 of the saves every 5 steps; TensorBoard events beside them.
    assert Checkpoints(str(workdir), read_only=True).all_steps() == steps[-11::5]
    assert glob.glob(str(workdir / "events.out.tfevents.*"))
    for key in ("tokens_per_second", "mfu", "learning_rate", "grad_norm", "overhead_fraction"):
        assert np.isfinite(metrics[steps[-1]][key])
    assert "checkpoint_save_seconds" in metrics[steps[-1]]


# SIGKILL and resume: tests/test_init_from.py (a run started from another, with dropout).


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    config = tiny_config(tmp_path / "cache", num_train_steps=10_000,
                         checkpoint_every_steps=10_000, eval_every_steps=0)
    workdir = tmp_path / "run"
    process = script("train.py", "--config=configs/tiny.py", *config_flags(config),
                     f"--workdir={workdir}", popen=True)
    while process.poll() is None and max(train_metrics(workdir) if (workdir / "metrics.jsonl")
                                         .exists() else [0]) < 3:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-2000:]
    steps = Checkpoints(str(workdir), read_only=True).all_steps()
    assert len(steps) == 1 and steps[0] >= 3
    assert f"SIGTERM: saved the checkpoint of step {steps[0]}" in out + err


def test_a_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    config = tiny_config(tmp_path / "cache", learning_rate=1e30, warmup_steps=0,
                         grad_clip_norm=0.0, checkpoint_every_steps=1, eval_every_steps=0)
    with pytest.raises(ValueError, match="non-finite loss .* the last good checkpoint"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    steps = Checkpoints(str(tmp_path / "run"), read_only=True).all_steps()
    assert steps  # the steps before the blow-up
    params = restore_params(tmp_path / "run")
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


# --- bad input: one line, non-zero exit, nothing lost ---------------------------------------

@pytest.mark.parametrize("flag, message", [
    ("--config.batch_size=0", "error: batch_size=0: expected an int >= 1"),
    ("--config.mesh.tensor=3", "error: mesh {'data': -1, 'fsdp': 1, 'context': 1, 'tensor': 3}: "
                               "8 devices are not divisible by 3"),
    ("--config.mesh.context=4 --config.seq_len=62",
     "error: seq_len=62 is not divisible by mesh.context=4"),
    ("--config.mesh.context=2 --config.model.scan_layers=True --config.model.remat=True "
     "--config.model.layer_chunk_size=24",
     "error: model.layer_chunk_size=24 with mesh.context=2: each device's block of 32 "
     "positions runs in chunks, so the chunk must divide it"),
    ("--config.model.num_heads=3", "error: model.d_model=32 is not divisible by "
                                   "model.num_heads=3; set model.head_dim"),
    ("--config.data.source=text", "error: data.paths"),
    ("--config.data.passkey_fraction=0.5", "error: data.passkey_fraction=0.5 needs "
                                           "data.packing='stream', not 'documents'"),
    ("--config.data.passkey_answer_weight=-2", "error: data.passkey_answer_weight=-2.0: "
                                               "expected a finite number >= 0"),
    ("--config.warmup_steps=50", "error: warmup_steps=50: expected fewer than num_train_steps=20"),
    ("--config.learning_rate=nan", "error: learning_rate=nan: expected a finite number"),
    ("--config.data.validation_fraction=1.5", "error: data.validation_fraction=1.5: expected a "
                                              "number in [0, 1)"),
    ("--config.sample_tokens=10000000000", "error: sample_tokens=10000000000: expected fewer "
                                           "than"),
    ("--config.min_learning_rate_ratio=5", "error: min_learning_rate_ratio=5.0: expected a "
                                           "number in [0, 1]"),
    ("--config.data.cache_dir=README.md", "error: data.cache_dir='README.md': cannot write "
                                          "the token cache there (it is a file)"),
    ("--config.model.rope_scaling.factor=inf",
     "error: model.rope_scaling.factor=inf: expected a finite number"),
    ("--config.model.foo=1", "error: --config.model.foo: unknown config field 'model.foo'"),
    ("--config.batch_size=abc", "error: flag --config.batch_size=abc: invalid literal for int()"),
    ("--config.seed=-1", "error: seed=-1: expected an int in [0, 2**31)"),
    ("--config.seed=9223372036854775808", "error: seed=9223372036854775808: expected an int"),
    ("--config.data.prefetch=-1", "error: data.prefetch=-1: expected an int >= 0"),
    ("--config.logical_axis_rules=1", "error: logical_axis_rules=(1,): expected (logical name, "
                                      "mesh axes) pairs"),
    ("--workdir=README.md", "error: --workdir='README.md': it is a file: expected a folder"),
    ("--workdir=", "error: --workdir is empty: expected a folder"),
    ("--config.data.cache_dir=/proc/none", "error: data.cache_dir='/proc/none': cannot write the "
                                           "token cache there"),
])
def test_bad_config_values_are_one_line_errors(flag, message, tmp_path):
    done = script("train.py", "--config=configs/tiny.py", f"--workdir={tmp_path}/run",
                  f"--config.data.cache_dir={tmp_path}/cache", *flag.split())
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), done.stderr[-1000:]
    assert "Traceback" not in done.stderr


def test_a_value_error_inside_jax_is_a_bug_with_its_traceback(tmp_path):
    """A ValueError that JAX raises during a run is a bug (ours or a library's), not a user's
    mistake: it reaches the user with its traceback and a non-zero exit, never as a one-line
    ``error:`` (only errors.UserError is). Injected in the training loop: jnp.split of 3
    elements in 2 raises ValueError from inside jax.numpy."""
    wrapper = tmp_path / "train_with_a_bug.py"
    wrapper.write_text(
        "import runpy, sys\n"
        "import jax.numpy as jnp\n"
        "import data.packing\n"
        "def broken(batch, bound):\n"
        "    jnp.split(jnp.arange(3), 2)\n"
        "data.packing.check_documents_per_row = broken\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        f"runpy.run_path({os.path.join(ROOT, 'train.py')!r}, run_name='__main__')\n")
    done = script(str(wrapper), "--config=configs/tiny.py", f"--workdir={tmp_path}/run",
                  f"--config.data.cache_dir={tmp_path}/cache")
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith("ValueError: array split does not "
                                                           "result in an equal division")
    assert "error: " not in done.stderr


def test_an_empty_data_file_is_a_one_line_error(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    done = script("train.py", "--config=configs/tiny.py", "--config.data.source=text",
                  f"--config.data.paths={empty}", f"--workdir={tmp_path}/run",
                  f"--config.data.cache_dir={tmp_path}/cache")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: ")


def test_one_large_text_file_trains_and_evaluates_on_its_tail(tmp_path):
    # One file is one document; its last 2% is the validation split (data/sources.py).
    corpus = tmp_path / "corpus.txt"
    # 50,000 characters of data/*.py: a tail (1,000 bytes) that the tiny config's evaluation
    # (1,024 tokens) covers, however those files grow.
    corpus.write_text("".join(open(p).read() for p in sorted(glob.glob(f"{ROOT}/data/*.py")))[:50_000])
    config = tiny_config(tmp_path / "cache", num_train_steps=3, eval_every_steps=0,
                         sample_tokens=0, **{"data.source": "text", "data.paths": str(corpus)})
    result = train.train_and_evaluate(config, str(tmp_path / "run"))
    # Every byte of the tail and its end of document is a target, but its first byte.
    tail = len(corpus.read_bytes()) * 0.02
    assert 0.9 * tail < result["num_tokens"] < 1.1 * tail and np.isfinite(result["loss"])


def _snapshot(folder):
    return {p: os.path.getsize(p) for p in glob.glob(f"{folder}/**", recursive=True)
            if os.path.isfile(p)}


def _shared_run_flags(trained) -> list[str]:
    """train.py's flags for the shared run's config and folders (tests/conftest.py)."""
    return ["--config=configs/tiny.py", *config_flags(trained["config"]),
            f"--workdir={trained['run']}"]


def test_resuming_with_another_model_is_a_one_line_error_and_keeps_the_checkpoints(trained):
    before = _snapshot(trained["run"] / "checkpoints")
    done = script("train.py", *_shared_run_flags(trained), "--config.model.d_model=64")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: model.d_model=64, but the checkpoints in {trained['run']}/checkpoints were "
        f"trained with 32: use another workdir, or the same value to resume")
    assert _snapshot(trained["run"] / "checkpoints") == before


def test_resuming_with_another_batch_size_is_a_one_line_error(trained):
    done = script("train.py", *_shared_run_flags(trained), "--config.batch_size=16")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith(
        "error: batch_size=16, but the checkpoints in")


def test_a_workdir_that_is_not_a_run_is_one_line_naming_the_right_flag(trained, tmp_path):
    """A Hugging Face folder, or a run's checkpoints folder, given as --workdir would start a
    new run inside it."""
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    checkpoints = trained["run"] / "checkpoints"
    for workdir, message in (
            (tmp_path / "hf", f"error: --workdir='{tmp_path}/hf' is a Hugging Face model folder, "
                              f"not a run: to start from it, --config.init_from={tmp_path}/hf"),
            (checkpoints, f"error: --workdir='{checkpoints}' is a run's checkpoints folder: the "
                          f"run is --workdir={trained['run']}")):
        before = _snapshot(workdir)
        done = script("train.py", "--config=configs/tiny.py", f"--workdir={workdir}",
                      f"--config.data.cache_dir={tmp_path}/cache")
        assert done.returncode == 1 and done.stderr.strip().startswith(message), done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
        assert _snapshot(workdir) == before


def test_a_tilde_in_the_workdir_is_the_home_folder(tmp_path):
    """The shell leaves --workdir=~/... as it is; the scripts expand it (here to a folder that
    cannot be made, so that nothing is written)."""
    done = script("train.py", "--config=configs/tiny.py", "--workdir=~/../proc/none/run",
                  f"--config.data.cache_dir={tmp_path}/cache")
    assert done.returncode == 1
    assert done.stderr.startswith(f"error: --workdir='{os.path.expanduser('~')}/../proc/none/"
                                  f"run': "), done.stderr


def test_resuming_past_num_train_steps_is_a_one_line_error(trained):
    """A run whose checkpoints are past num_train_steps has nothing to train: said so, rather
    than 'resuming' and evaluating as if it had."""
    before = _snapshot(trained["run"])
    done = script("train.py", *_shared_run_flags(trained), "--config.num_train_steps=6",
                  "--config.warmup_steps=1")
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"error: num_train_steps=6, but the checkpoints in {trained['run']}/checkpoints are at "
        f"step {SHARED_STEPS}: raise it to train on (evaluate_run.py evaluates the run as it is)")
    assert _snapshot(trained["run"]) == before


def test_the_attention_kernel_and_document_bound_may_change_on_resume(trained, tmp_path):
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(trained["run"], workdir)
    config = trained["config"].copy_and_resolve_references()
    config.update(num_train_steps=SHARED_STEPS + 1, eval_every_steps=0)
    config.model.update(attention_implementation="dense", max_documents_per_row=4)
    result = train.train_and_evaluate(config, str(workdir))
    assert max(train_metrics(workdir)) == SHARED_STEPS + 1 and np.isfinite(result["loss"])


def test_a_corrupt_checkpoint_is_a_one_line_error_and_is_left_alone(trained, tmp_path):
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(trained["run"], workdir)
    latest = max(Checkpoints(str(workdir), read_only=True).all_steps())
    victims = sorted(glob.glob(f"{workdir}/checkpoints/{latest}/state/**/*", recursive=True))
    victims = [p for p in victims if os.path.isfile(p) and os.path.getsize(p) > 100]
    with open(victims[0], "r+b") as f:
        f.write(b"\0" * 100)
    before = _snapshot(workdir / "checkpoints")
    for name in ("train.py", "evaluate_run.py"):
        args = _shared_run_flags(trained)[:-1] if name == "train.py" else []
        done = script(name, *args, f"--workdir={workdir}",
                      f"--config.data.cache_dir={trained['cache']}")
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert "Traceback" not in done.stdout and "Event loop" not in done.stderr
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: the checkpoint {workdir}/checkpoints/{latest} cannot be "
                               f"restored"), last
        assert _snapshot(workdir / "checkpoints") == before


def test_a_full_disk_during_a_save_is_one_line_and_the_same_command_resumes(tmp_path):
    # A 1.5 MB file system: the tiny run's checkpoints (~0.5 MB each, every 2 steps) fill it.
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1500k", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root or CAP_SYS_ADMIN): "
                    f"{mounted.stderr.strip()}")
    try:
        args = ["--config=configs/tiny.py", "--config.checkpoint_every_steps=2",
                f"--workdir={disk}/run", f"--config.data.cache_dir={tmp_path}/cache"]
        full = script("train.py", *args)
        assert full.returncode == 1, full.stderr[-2000:]
        lines = full.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in full.stdout, full.stderr[-3000:]
        intact = sorted(int(p.name) for p in (disk / "run" / "checkpoints").iterdir()
                        if p.name.isdigit())
        assert not intact or intact[-1] < 20
        # Usually a save or two fit first; on a loaded machine the first may already fail.
        kept = (rf"\(steps {', '.join(map(str, intact))}\) are intact: free space \(or fix the "
                rf"folder\) and run the same command to resume from step {intact[-1]}"
                if intact else r"are none: free space \(or fix the folder\) and run the same "
                               r"command to start again")
        assert re.fullmatch(
            rf"error: saving a checkpoint in {re.escape(str(disk))}/run/checkpoints failed "
            rf"\(.+\); the complete checkpoints there {kept}", lines[0]), lines[0]

        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        resumed = script("train.py", *args)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert (f"resuming at step {intact[-1]}" if intact else "starting") in resumed.stdout
        assert sorted(train_metrics(disk / "run")) == list(range(1, 21))
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_logs_that_cannot_be_written_are_one_line_errors(tmp_path):
    """At the start: a folder where metrics.jsonl goes (mid-run: tests/test_metrics.py)."""
    run = tmp_path / "run"
    (run / "metrics.jsonl").mkdir(parents=True)
    done = script("train.py", "--config=configs/tiny.py", f"--workdir={run}",
                  f"--config.data.cache_dir={tmp_path}/cache")
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0] == (
        f"error: writing the logs in {run} failed (IsADirectoryError: Is a directory); the "
        f"checkpoints saved so far are kept: free space (or fix the folder) and run the same "
        f"command to resume"), done.stderr[-2000:]


def test_the_hub_out_of_reach_is_one_line_saying_what_to_do(tmp_path):
    """configs/pg19.py without network (the Hub offline, nothing cached): one line naming the
    dataset and the ways on, not datasets' ConnectionError traceback."""
    done = script("train.py", "--config=configs/pg19.py", f"--workdir={tmp_path}/run",
                  f"--config.data.cache_dir={tmp_path}/cache",
                  env=dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                           HF_HOME=str(tmp_path / "hf")))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("error: data.hf_name='emozilla/pg19': cannot reach the Hugging Face "
                           "Hub"), line
    assert "HF_DATASETS_OFFLINE=1" in line and "data.paths" in line


@pytest.mark.parametrize("kind", ["sentencepiece", "hf"])
def test_a_tokenizer_replaced_under_the_same_path_is_refused_in_one_line(kind, tmp_path):
    """A run trains with a tokenizer file (a SentencePiece model, or a Hugging Face folder's
    tokenizer.json); another tokenizer of the same padded vocabulary but other pieces is then
    written over it. Resuming, evaluating, generating, exporting and starting a run from it
    (init_from) each stop in one line naming both identities; nothing is written."""
    import shutil

    from data.sources import read_documents
    from data.tokenizers import SentencePieceTokenizer, train_sentencepiece
    from hf.tokenizer import HuggingFaceTokenizer, export_tokenizer

    documents = list(read_documents(tiny_config(tmp_path / "cache").data, "train"))
    models = {}
    for name, part in (("first", documents[:10]), ("other", documents[10:20])):
        models[name] = str(tmp_path / f"{name}.model")
        train_sentencepiece(part, models[name], vocab_size=400)
    first, other = (SentencePieceTokenizer(models[name]) for name in ("first", "other"))
    assert first.vocab_size == other.vocab_size and first.name != other.name
    if kind == "sentencepiece":
        path = tmp_path / "tokenizer.model"
        shutil.copy(models["first"], path)
        flags = ["--config.data.tokenizer=sentencepiece",
                 f"--config.data.sentencepiece_model={path}"]

        def replace():
            shutil.copy(models["other"], path)
    else:
        path = tmp_path / "tokenizer"
        path.mkdir()
        (tmp_path / "other").mkdir()
        export_tokenizer(first, str(path), model_max_length=64)
        export_tokenizer(other, str(tmp_path / "other"), model_max_length=64)
        flags = ["--config.data.tokenizer=hf", f"--config.data.hf_tokenizer={path}"]

        def replace():
            shutil.copy(tmp_path / "other" / "tokenizer.json", path / "tokenizer.json")
    run, cache = tmp_path / "run", f"--config.data.cache_dir={tmp_path}/cache"
    train_flags = ["--config=configs/tiny.py", *flags, f"--workdir={run}", cache,
                   "--config.num_train_steps=2", "--config.warmup_steps=1",
                   "--config.eval_every_steps=0",
                   "--config.eval_batches=1", "--config.sample_tokens=0"]
    done = script("train.py", *train_flags)
    assert done.returncode == 0, done.stderr[-2000:]
    trained_with = json.loads((run / "checkpoints" / "2" / "tokenizer" / "metadata").read_text())
    replace()
    now = (other if kind == "sentencepiece" else HuggingFaceTokenizer(str(path)))
    assert now.name != trained_with["name"]
    before = _snapshot(run)
    for name, args in (("train.py", train_flags + ["--config.num_train_steps=4"]),
                       ("evaluate_run.py", [f"--workdir={run}", cache]),
                       ("generate.py", [f"--workdir={run}"]),
                       ("export.py", [f"--workdir={run}", f"--output={tmp_path}/hf"]),
                       ("train.py", ["--config=configs/tiny.py", f"--config.init_from={run}",
                                     f"--workdir={tmp_path}/new", cache])):
        done = script(name, *args)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith("error: ") and (
            f" is the tokenizer {now.name} ({first.vocab_size} ids), but the checkpoints in "
            f"{run}/checkpoints were trained with {trained_with['name']} "
            f"({first.vocab_size} ids): ") in lines[0]
    assert _snapshot(run) == before
    assert not os.path.exists(tmp_path / "hf")
    assert not glob.glob(f"{tmp_path}/new/checkpoints/*")
