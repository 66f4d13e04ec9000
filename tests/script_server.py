"""A fork server for the scripts the tests run (train.py, evaluate_run.py, generate.py, export.py,
bench/*.py): each run is a real process of its own (its own pid, exit status, stdout,
stderr, signal handlers and interpreter shutdown), forked from a server that has already
imported JAX and the project's libraries, so it starts in milliseconds instead of the 2-3 s
a fresh ``python script.py`` spends importing. Like multiprocessing's "forkserver" start
method; the server never starts a JAX backend, so each run starts its own, as a new process
does.

    done = run_script(["train.py", "--config=configs/tiny.py"], cwd=ROOT, timeout=600)

A run whose environment differs from the tests' is not for this server (libraries read
some variables when imported): `tests.training.script` starts those as new processes.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import select
import signal
import subprocess
import sys
import tempfile
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What the scripts import, less the scripts themselves (evaluate_run.py and generate.py define
# their flags when imported) and what starts a JAX backend or threads.
PRELOADED = ["numpy", "jax", "jax.numpy", "flax.linen", "optax", "orbax.checkpoint", "grain",
             "ml_collections", "absl.app", "absl.flags", "absl.logging", "tensorboardX", "tqdm",
             "matplotlib", "safetensors", "tokenizers", "sentencepiece", "cli", "launch",
             "configs.default", "data", "model", "steps", "checkpoints", "run_config", "sharding",
             "inference", "init_from", "metrics", "probes", "plots", "stop_signal", "folders",
             "hf.folder", "hf.params", "hf.tokenizer"]


# --- the server (python -m tests.script_server) -------------------------------------------

def serve() -> None:
    """Reads one JSON request per line on stdin ({"argv", "cwd", "stdout", "stderr"}); for
    each, forks a run and answers two lines: its pid, then its exit status as subprocess
    gives it (negative: the signal that ended it)."""
    import importlib

    for name in PRELOADED:
        importlib.import_module(name)
    from jax._src import xla_bridge
    assert not xla_bridge._backends, "a preloaded module started a JAX backend"
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # nothing else may write into the answers
    answers.write("ready\n")
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            answers.close()
            _become_the_run(request)  # ends the process as the script's own end does
        answers.write(f"{pid}\n")
        _, status = os.waitpid(pid, 0)
        answers.write(f"{os.waitstatus_to_exitcode(status)}\n")


def _become_the_run(request: dict) -> None:
    """Turns the forked child into ``python argv...`` run from ``cwd``: its stdin empty, its
    output into the request's files, fresh random seeds, then the script as ``__main__``.
    What the script raises, or its SystemExit, ends the interpreter as it would end a new
    one (traceback and status 1, atexit handlers, threads joined)."""
    import numpy as np

    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    for fd, key in ((1, "stdout"), (2, "stderr")):
        os.dup2(os.open(request[key], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    sys.stdin = open(0, closefd=False)
    os.chdir(request["cwd"])
    np.random.seed()  # a new process's numpy draws its own seed (random reseeds on fork)
    path = request["argv"][0]
    sys.argv = list(request["argv"])
    sys.path[0] = os.path.dirname(os.path.abspath(path))
    runpy.run_path(path, run_name="__main__")
    raise SystemExit(0)


# --- the client (in each pytest process) -------------------------------------------------

_server: subprocess.Popen | None = None
_lock = threading.Lock()


def _started() -> subprocess.Popen:
    global _server
    if _server is None or _server.poll() is not None:
        _server = subprocess.Popen([sys.executable, "-m", "tests.script_server"], cwd=ROOT,
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        atexit.register(_server.kill)
        if _answer(_server, timeout=300) != "ready":
            raise RuntimeError("the script server did not start: see the tests' stderr")
    return _server


def _answer(server: subprocess.Popen, timeout: float | None = None) -> str | None:
    """The server's next line, or None where none comes within ``timeout`` seconds (read
    byte by byte, unbuffered: a line already read ahead could not be waited for)."""
    line = b""
    while not line.endswith(b"\n"):
        if not select.select([server.stdout], [], [], timeout)[0]:
            return None
        byte = server.stdout.read(1)
        if not byte:
            raise RuntimeError("the script server ended: see the tests' stderr")
        line += byte
    return line.decode().strip()


def run_script(argv: list[str], cwd: str, timeout: float) -> subprocess.CompletedProcess:
    """``python *argv`` from ``cwd`` as `subprocess.run(capture_output=True, text=True)` gives
    it, run by the fork server; `subprocess.TimeoutExpired` (the run killed) after
    ``timeout`` seconds."""
    with _lock, tempfile.TemporaryDirectory() as folder:
        server = _started()
        out, err = os.path.join(folder, "stdout"), os.path.join(folder, "stderr")
        server.stdin.write((json.dumps({"argv": argv, "cwd": cwd, "stdout": out,
                                        "stderr": err}) + "\n").encode())
        pid = int(_answer(server))
        returncode = _answer(server, timeout)
        if returncode is None:
            os.kill(pid, signal.SIGKILL)
            _answer(server)
            raise subprocess.TimeoutExpired(argv, timeout)
        returncode = int(returncode)
        with open(out) as stdout, open(err) as stderr:
            return subprocess.CompletedProcess(argv, returncode, stdout.read(), stderr.read())


if __name__ == "__main__":
    serve()
