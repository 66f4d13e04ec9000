"""Helpers for the tests of train.py, evaluate_run.py and generate.py."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from tests.script_server import run_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(cache_dir, **overrides):
    """configs/tiny.py with its token cache in ``cache_dir`` and ``overrides`` (dotted keys)."""
    from configs import tiny

    config = tiny.get_config()
    config.data.cache_dir = str(cache_dir)
    for key, value in overrides.items():
        parent, _, name = key.rpartition(".")
        (config[parent] if parent else config)[name] = value
    return config


# The shared tiny run (tests/conftest.py's ``trained``): configs/tiny.py as it is (evaluation
# every 10 steps, samples, checkpoints every 5 of which 3 are kept), for
# enough steps to write more than spaces.
SHARED_STEPS = 80


def build_once(name: str, build) -> pathlib.Path:
    """``$TESTS_SHARED_RUNS/name``, made by ``build(folder)`` once per test session, whichever
    pytest-xdist worker asks first (the others wait for it; tests/conftest.py sets the
    folder). Tests only read it: one that changes a run works on a copy."""
    from filelock import FileLock

    root = pathlib.Path(os.environ["TESTS_SHARED_RUNS"])
    root.mkdir(parents=True, exist_ok=True)
    folder, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # a build that failed half-way
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


def config_flags(config) -> list[str]:
    """The --config.* flags that turn configs/tiny.py into ``config`` (leaves only)."""
    from configs import tiny

    base = _flatten(tiny.get_config().to_dict())
    return [f"--config.{k}={v}" for k, v in _flatten(config.to_dict()).items()
            if base.get(k) != v]


def _flatten(tree, prefix=""):
    flat = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            flat |= _flatten(v, f"{prefix}{k}.")
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def script(name: str, *args: str, **kwargs) -> subprocess.CompletedProcess | subprocess.Popen:
    """Runs ``python <name> args`` from the repository root, a process of its own: forked
    from tests/script_server.py (JAX already imported) in the tests' environment; started
    anew where ``env`` sets another, or with ``popen=True`` (started, to signal it)."""
    path = os.path.join(ROOT, name)
    if kwargs.pop("popen", False):
        return subprocess.Popen([sys.executable, path, *args], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, **kwargs)
    if "env" in kwargs:
        return subprocess.run([sys.executable, path, *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=600, **kwargs)
    return run_script([path, *args], cwd=ROOT, timeout=600)


def train_metrics(workdir) -> dict[int, dict]:
    """metrics.jsonl's training lines by step."""
    rows = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if "loss" in row:
                rows[row["step"]] = row
    return rows


def restore_params(workdir, step=None):
    """The parameters (numpy) of ``workdir``'s checkpoint (latest where step is None)."""
    import inference

    return jax.tree.map(np.asarray, inference.load_for_inference(str(workdir), step=step).params)


def count_restored_arrays(monkeypatch) -> list[int]:
    """The number of arrays orbax reads from here on, one count per read (a list that grows):
    orbax's ArrayHandler.deserialize, wrapped with ``monkeypatch``."""
    import orbax.checkpoint as ocp

    counts, deserialize = [], ocp.type_handlers.ArrayHandler.deserialize

    async def counting(self, infos, args=None):
        counts.append(len(infos))
        return await deserialize(self, infos, args)

    monkeypatch.setattr(ocp.type_handlers.ArrayHandler, "deserialize", counting)
    return counts


def kill_after_a_checkpoint(flags: list[str], workdir, kill_after: int) -> None:
    """Starts ``train.py flags --workdir=workdir`` and SIGKILLs it once it has logged step
    ``kill_after`` and holds a complete checkpoint (orbax renames a finished save to its
    step); fails where the run ends first."""
    process = script("train.py", *flags, f"--workdir={workdir}", popen=True)
    metrics = workdir / "metrics.jsonl"

    def checkpointed():
        folder = workdir / "checkpoints"
        return folder.exists() and any(p.name.isdigit() for p in folder.iterdir())

    while process.poll() is None:
        if (metrics.exists() and max(train_metrics(workdir), default=0) >= kill_after
                and checkpointed()):
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"


def check_sigkill_resume_is_exact(config, tmp_path, num_steps: int,
                                  kill_after: int) -> dict[int, dict]:
    """Runs ``config`` uninterrupted (in-process, as train.py's main does: the same compiled
    programs), and as ``train.py`` SIGKILLed after step ``kill_after``
    (`kill_after_a_checkpoint`) then resumed by the same command; asserts both logged the
    same loss, gradient norm and learning rate at every step and ended with the same
    parameters. Returns the uninterrupted run's metrics by step."""
    import init_from
    import train

    uninterrupted, interrupted = tmp_path / "uninterrupted", tmp_path / "interrupted"
    flags = ["--config=configs/tiny.py"] + config_flags(config)
    reference = config.copy_and_resolve_references()
    given = {flag.split("=")[0][len("--config."):] for flag in flags[1:]}
    init_from.adopt_source_config(reference, str(uninterrupted), given)
    train.train_and_evaluate(reference, str(uninterrupted))
    kill_after_a_checkpoint(flags, interrupted, kill_after)
    resumed = script("train.py", *flags, f"--workdir={interrupted}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming at step" in resumed.stdout + resumed.stderr

    expected, got = train_metrics(uninterrupted), train_metrics(interrupted)
    assert sorted(got) == sorted(expected) == list(range(1, num_steps + 1))
    for step in expected:
        for key in ("loss", "grad_norm", "learning_rate"):
            assert got[step][key] == expected[step][key], (step, key)
    for a, b in zip(jax.tree.leaves(restore_params(uninterrupted)),
                    jax.tree.leaves(restore_params(interrupted)), strict=True):
        np.testing.assert_array_equal(a, b)
    return expected
