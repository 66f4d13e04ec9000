"""train.py and evaluate_run.py in two processes on this machine, as a multi-host launch runs them:
a loopback coordinator (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
``JAX_PROCESS_ID``), gloo collectives between the CPU processes, 4 simulated devices each,
so the same 8-device data-parallel mesh as a 1-process run on 8 devices, the reference.

Checked: the same losses and parameters as the reference (float32 rounding), each process
feeding exactly its own rows; checkpoints that move between 2 processes and 1; SIGKILL of one
process ends the other (non-zero, within 60 s), and the same command resumes to the
reference's end; bad launches are one-line errors in bounded time.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zlib

import jax
import numpy as np
import pytest

from checkpoints import Checkpoints
from tests.training import ROOT, config_flags, restore_params, tiny_config, train_metrics

# End-to-end (the scripts run as processes, trained runs): out of the quick tier.
pytestmark = pytest.mark.slow

STEPS = 24
CHECKPOINT_EVERY = 4
TIMEOUT = 300  # seconds for any one launch: a hang fails the test rather than the suite


_PORTS_GIVEN: set[int] = set()


def _free_port() -> int:
    """A free loopback port, never one given before in this session: two launches started
    together (step 3 below) must not get the same coordinator port, which the system may
    hand out again once the probing socket is closed."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _PORTS_GIVEN:
            _PORTS_GIVEN.add(port)
            return port


def _environment(devices: int, **variables) -> dict:
    # A process of a multi-process launch compiles its own programs: under jax 0.12.1, the
    # processes of a run whose programs come from JAX's persistent compilation cache
    # (tests/conftest.py) can wait for each other's collectives forever on CPU (seen here: a
    # resumed 2-process run hung at its first step, or at its final evaluation).
    dropped = ("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID") + (
        ("JAX_COMPILATION_CACHE_DIR",) if "JAX_NUM_PROCESSES" in variables else ())
    env = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
    # The suite's XLA flags (tests/conftest.py), with this launch's device count.
    xla_flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                       env.get("XLA_FLAGS", ""))
    # PYTHONFAULTHANDLER: a hung process prints its threads' stacks when `finish` aborts it.
    return env | {"JAX_PLATFORMS": "cpu", "PYTHONFAULTHANDLER": "1",
                  "XLA_FLAGS": f"{xla_flags} --xla_force_host_platform_device_count={devices}"
                  .strip()} | variables


def launch_processes(command: list[str], processes: int, **variables) -> list[subprocess.Popen]:
    """``python *command`` from the repository root: one process on 8 CPU devices, or
    ``processes`` of a multi-process run with 8 / processes devices each."""
    if processes == 1:
        envs = [_environment(8, **variables)]
    else:
        address = f"127.0.0.1:{_free_port()}"
        envs = [_environment(8 // processes, JAX_COORDINATOR_ADDRESS=address,
                             JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(index),
                             **variables) for index in range(processes)]
    return [start(command, env) for env in envs]


def start(command: list[str], env: dict) -> subprocess.Popen:
    """``python *command`` from the repository root, printing into a file (not a pipe: a
    process never blocks on a full pipe while we wait for it)."""
    log = tempfile.TemporaryFile("w+")
    process = subprocess.Popen([sys.executable, *command], cwd=ROOT, env=env, stdout=log,
                               stderr=subprocess.STDOUT)
    process.log = log
    return process


def output(process: subprocess.Popen) -> str:
    """What an exited process printed (stdout and stderr)."""
    process.log.seek(0)
    return process.log.read()


def finish(processes: list[subprocess.Popen], timeout: float = TIMEOUT) -> list[str]:
    """Waits for every process to exit 0 (at most ``timeout`` seconds in all); returns their
    outputs."""
    deadline = time.monotonic() + timeout
    try:
        for process in processes:
            process.wait(timeout=max(deadline - time.monotonic(), 0))
    except subprocess.TimeoutExpired:
        for process in processes:  # a hang: its Python stacks into its output, then the end
            if process.poll() is None:
                process.send_signal(signal.SIGABRT)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
    finally:
        for process in processes:
            process.kill()
            process.wait()
    outputs = [output(process) for process in processes]
    for index, (process, text) in enumerate(zip(processes, outputs)):
        assert process.returncode == 0, f"{process.args[1:3]} #{index}: {text[-3000:]}"
    return outputs


def train_command(workdir, flags, record=None) -> list[str]:
    command = ["train.py"] if record is None else ["tests/train_recording_rows.py", str(record)]
    return command + flags + [f"--workdir={workdir}"]


def _copy_up_to(source, destination, step: int) -> None:
    """A copy of the run in ``source`` as it was when ``step`` was its latest checkpoint."""
    shutil.copytree(source, destination)
    for path in (destination / "checkpoints").iterdir():
        if path.name.isdigit() and int(path.name) > step:
            shutil.rmtree(path)


def _checkpoint_after(workdir, step: int) -> bool:
    """Whether a complete checkpoint after ``step`` exists (orbax renames a finished save to
    its step)."""
    folder = workdir / "checkpoints"
    return any(p.name.isdigit() and int(p.name) > step for p in folder.iterdir())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every launch the tests below look at, in three phases (processes side by side where
    they can be, since the fixed costs of a launch dominate):

    1. ``reference``: 1 process, 8 devices; ``two``: the same run in 2 processes, each
       recording the arrays it feeds (tests/train_recording_rows.py).
    2. ``killed``: the reference's checkpoint of step 4 resumed in 2 processes, process 1
       SIGKILLed once a checkpoint of their own is complete. While process 0 finds out:
       ``two_to_one``, the 2-process checkpoint of step 12 resumed in 1 process.
    3. The killed run's command again, and evaluate_run.py on ``two`` in 2 processes.
    """
    root = tmp_path_factory.mktemp("multiprocess")
    config = tiny_config(root / "cache", num_train_steps=STEPS, keep_checkpoints=STEPS,
                         checkpoint_every_steps=CHECKPOINT_EVERY, eval_every_steps=0,
                         sample_tokens=0, peak_flops_per_device=1e12,
                         **{"model.dropout_rate": 0.1})
    # The token cache once, here, so that the processes below only read it.
    from data import make_tokenizer, packed_examples
    packed_examples(config.data, "train", make_tokenizer(config.data), config.seq_len)
    flags = ["--config=configs/tiny.py"] + config_flags(config)
    run = {"root": root, "config": config}
    # Single-process launches after the first reuse its compiled programs through the suite's
    # persistent compilation cache (tests/conftest.py); multi-process ones compile their own.
    launch = launch_processes
    for name in ("reference", "two", "killed", "two_to_one"):
        run[name] = root / name

    # 1.
    finish(launch(train_command(run["reference"], flags), 1)
           + launch(train_command(run["two"], flags, record=root / "fed"), 2))

    # 2.
    _copy_up_to(run["reference"], run["killed"], CHECKPOINT_EVERY)
    _copy_up_to(run["two"], run["two_to_one"], 3 * CHECKPOINT_EVERY)
    command = train_command(run["killed"], flags)
    # A heartbeat timeout of 5 s rather than 20: the survivor finds out sooner.
    killed = launch(command, 2, JAX_HEARTBEAT_TIMEOUT="5")
    try:
        deadline = time.monotonic() + TIMEOUT
        while all(p.poll() is None for p in killed) and not _checkpoint_after(
                run["killed"], CHECKPOINT_EVERY):
            assert time.monotonic() < deadline, "the resumed run wrote no checkpoint in time"
            time.sleep(0.02)
        killed[1].send_signal(signal.SIGKILL)  # not the coordinator: found by heartbeats
        kill_time = time.monotonic()
        # Only a single process beside the dying run: a new gloo group could take over the
        # ports of the dead process while its survivor still dials them.
        two_to_one = launch(train_command(run["two_to_one"], flags), 1)
        try:
            killed[0].wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        run["survivor_seconds"] = time.monotonic() - kill_time
    finally:
        for process in killed:
            process.kill()
    run["returncodes"] = [p.wait() for p in killed]
    run["killed_output"] = output(killed[0])
    run["killed_resumed_at"] = Checkpoints(str(run["killed"]), read_only=True).latest_step()
    run["two_to_one_output"], = finish(two_to_one)

    # 3.
    outputs = finish(launch(command, 2) + launch(
        ["evaluate_run.py", f"--workdir={run['two']}", f"--output={root / 'evaluated.json'}"], 2))
    run["rerun_output"], run["evaluate_outputs"] = outputs[0], outputs[2:]
    run["reference_params"] = restore_params(run["reference"])
    return run


def _assert_same_run(runs, name, steps=range(1, STEPS + 1)):
    """Run ``name`` logged the reference's losses and gradient norms at ``steps`` and ended
    with its parameters (float32 rounding)."""
    got, expected = train_metrics(runs[name]), train_metrics(runs["reference"])
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
    for step in steps:
        for key in ("loss", "grad_norm"):
            np.testing.assert_allclose(got[step][key], expected[step][key], rtol=1e-5,
                                       err_msg=f"step {step} {key}")
    for a, b in zip(jax.tree.leaves(restore_params(runs[name])),
                    jax.tree.leaves(runs["reference_params"]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_two_processes_train_as_one_and_each_feeds_only_its_rows(runs):
    _assert_same_run(runs, "two")

    # What each process fed, against the rows TrainBatches gives process p of 2 (rows
    # [4p, 4p + 4) of each global batch of 8): the STEPS batches, key by key.
    from data import TrainBatches, make_tokenizer, packed_examples
    config = runs["config"]
    examples = packed_examples(config.data, "train", make_tokenizer(config.data), config.seq_len)
    for process in (0, 1):
        with open(f"{runs['root'] / 'fed'}.{process}") as f:
            fed = [json.loads(line) for line in f]
        rows = TrainBatches(examples, config.batch_size, config.seed, process_index=process,
                            process_count=2)
        expected = [[list(array.shape), zlib.crc32(np.ascontiguousarray(array).tobytes())]
                    for _ in range(STEPS) for array in next(rows).values()]
        assert fed[:len(expected)] == expected, f"process {process}"
        assert all(shape[0] == config.batch_size // 2 for shape, _ in fed)  # and no more


def test_evaluate_in_two_processes_matches_one(runs):
    import evaluate_run

    assert '"loss"' in runs["evaluate_outputs"][0]  # process 0 reports; process 1 does not
    assert '"loss"' not in runs["evaluate_outputs"][1]
    two = json.loads((runs["root"] / "evaluated.json").read_text())
    one = evaluate_run.evaluate(str(runs["two"]))
    assert two["num_tokens"] == one["num_tokens"] > 0
    np.testing.assert_allclose(two["loss"], one["loss"], rtol=1e-5)


def test_checkpoints_move_between_two_processes_and_one(runs):
    # 2 -> 1: the checkpoint of step 12 that 2 processes wrote, resumed in one.
    assert f"resuming at step {3 * CHECKPOINT_EVERY}" in runs["two_to_one_output"]
    _assert_same_run(runs, "two_to_one")
    # 1 -> 2: the reference's checkpoint of step 4 resumed in 2 processes (the killed run,
    # whose steps 5 to its own first checkpoint are compared here).
    assert f"resuming at step {CHECKPOINT_EVERY}" in runs["killed_output"]
    got, expected = train_metrics(runs["killed"]), train_metrics(runs["reference"])
    for step in range(CHECKPOINT_EVERY + 1, runs["killed_resumed_at"] + 1):
        np.testing.assert_allclose(got[step]["loss"], expected[step]["loss"], rtol=1e-5)


def test_sigkill_of_one_process_ends_the_other_and_the_same_command_resumes(runs):
    assert runs["returncodes"][1] == -signal.SIGKILL, "the run ended before it could be killed"
    # The survivor says in one line what happened and what to do: its next collective or
    # barrier fails (jax 0.12 raises: launch.lost_peer_message), or the heartbeats abort it
    # (the supervisor names the timeout).
    assert runs["returncodes"][0] == 1, runs["killed_output"][-3000:]
    errors = [line for line in runs["killed_output"].splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(
        "error: process 0 of 2 stopped"), runs["killed_output"][-3000:]
    assert "another process of the run was lost" in errors[0]
    assert "gloo" in errors[0].lower() or "heartbeat" in errors[0].lower(), errors[0]
    assert "free space" not in runs["killed_output"]  # not blamed on the checkpoint's disk
    assert "run the same command again in every process to resume" in errors[0]
    assert runs["survivor_seconds"] < 60
    assert "[Gloo]" not in runs["rerun_output"]  # gloo's "connected" notes are dropped
    assert f"resuming at step {runs['killed_resumed_at']}" in runs["rerun_output"]
    assert runs["killed_resumed_at"] > CHECKPOINT_EVERY
    _assert_same_run(runs, "killed")


def _one_line_error(process: subprocess.Popen, timeout: float) -> str:
    """The ``error: ...`` line of ``process``, which must exit 1 within ``timeout`` seconds of
    the call, printing that line and no traceback."""
    try:
        process.wait(timeout=timeout)
    finally:
        process.kill()
    text = output(process)
    assert process.returncode == 1, text[-3000:]
    lines = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in text, text[-3000:]
    return lines[0]


def test_bad_launches_are_one_line_errors(tmp_path):
    flags = ["--config=configs/tiny.py", f"--config.data.cache_dir={tmp_path / 'cache'}"]
    # Processes started with different counts: both stop at once.
    address = f"127.0.0.1:{_free_port()}"
    disagreeing = [start(train_command(tmp_path / "disagree", flags),
                         _environment(4, JAX_COORDINATOR_ADDRESS=address,
                                      JAX_NUM_PROCESSES=count, JAX_PROCESS_ID=index))
                   for index, count in (("0", "2"), ("1", "3"))]
    # Process 1 of 2, and process 0 never comes: an error once JAX_INITIALIZATION_TIMEOUT is up.
    alone = launch_processes(train_command(tmp_path / "alone", flags), 1, JAX_INITIALIZATION_TIMEOUT="5",
                   JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID="1")[0]
    # Two processes that agree on three: no third joins, JAX aborts them; one line each.
    address = f"127.0.0.1:{_free_port()}"
    short = [start(train_command(tmp_path / "short", flags),
                   _environment(4, JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES="3",
                                JAX_PROCESS_ID=str(index), JAX_INITIALIZATION_TIMEOUT="5"))
             for index in range(2)]
    for index, process in enumerate(short):
        line = _one_line_error(process, 60)
        assert line.startswith(f"error: process {index} of 3 stopped (SIGABRT"), line
        assert "before every process joined (within JAX_INITIALIZATION_TIMEOUT=5 s)" in line
    assert "started with 3 processes, process 0 with 2" in _one_line_error(disagreeing[1], 60)
    assert "started with 2 processes, process 1 with 3" in _one_line_error(disagreeing[0], 60)
    assert "JAX_INITIALIZATION_TIMEOUT=5 s" in _one_line_error(alone, 60)


def test_sentencepiece_is_trained_by_process_0_and_read_by_both(tmp_path):
    """The workdir's SentencePiece model: process 0 trains it while process 1 waits at a
    barrier, then both load the same file (a different vocabulary in one process would end
    the run at its first collective)."""
    config = tiny_config(tmp_path / "cache", num_train_steps=3, eval_every_steps=0,
                         sample_tokens=0, **{"data.tokenizer": "sentencepiece",
                                             "data.sentencepiece_vocab_size": 400,
                                             "data.max_documents": 12})
    flags = ["--config=configs/tiny.py"] + config_flags(config)
    workdir = tmp_path / "run"
    finish(launch_processes(train_command(workdir, flags), 2))
    assert (workdir / "sentencepiece.model").exists()
    assert json.loads((workdir / "sentencepiece.json").read_text())["vocab_size"] == 400
    saved = Checkpoints(str(workdir), read_only=True).restore_config()[1]
    assert saved.data.tokenizer == "sentencepiece" and sorted(train_metrics(workdir)) == [1, 2, 3]
