"""The command line of train.py, evaluate.py, generate.py and bench/: flags in, one-line errors
out, and joining a multi-process launch.

A user's mistake (a missing config file, an unknown ``--config.*`` field at any depth, a value
of the wrong type, an unknown flag, a bad launch) is one line, ``error: ...`` naming the
culprit, and exit status 1: no traceback. The scripts raise ValueError for bad input and hand
it to `exit_with_error`.

    cli.define_config_file(path, help)   # --config=FILE and its --config.KEY=VALUE overrides
    flags.DEFINE_string(...)              # the script's own flags
    cli.run(main)                         # absl's app.run with the one-line flag errors
"""

from __future__ import annotations

import argparse
import difflib
import glob
import importlib.util
import os
import platform
import re
import socket
import sys
import time
import traceback
from typing import NoReturn

import ml_collections
from absl import app, flags
from ml_collections import config_flags

REPO_ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(REPO_ROOT, "configs", "default.py")


def exit_with_error(error: Exception | str) -> NoReturn:
    """Prints ``error: ...`` (one line) and exits 1, for the user's mistakes. Exits at once:
    after a failed restore or save, orbax's abandoned reads and writes would print tracebacks
    at shutdown (nothing is left to write)."""
    print(f"error: {error}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


# --- absl flags (train.py, evaluate.py, generate.py, bench/train.py) -------------------------

def define_config_file(default_path: str, help_string: str) -> None:
    """``--config=FILE[:ARG]`` (default ``default_path``) with ``--config.KEY=VALUE``
    overrides, as ml_collections' ``DEFINE_config_file`` (locked: no new fields). A missing
    file or an unknown field is a one-line error here, before any work."""
    path = _flag_argument(sys.argv, "config") or default_path
    _check_overrides(load_config_file(path), sys.argv)
    _define(lambda: config_flags.DEFINE_config_file("config", default_path, help_string,
                                                    lock_config=True))


def define_config_dict(config: ml_collections.ConfigDict, help_string: str) -> None:
    """``--config.KEY=VALUE`` overrides of ``config``; an unknown field is a one-line error."""
    _check_overrides(config, sys.argv)
    _define(lambda: config_flags.DEFINE_config_dict("config", config, help_string))


def _define(define) -> None:
    try:  # config_flags reads the overrides from sys.argv already here
        define()
    except flags.Error as error:  # e.g. --config.model=... after --config.model.KEY=...
        exit_with_error(_first_line(error))


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """``get_config(ARG)`` of ``FILE[:ARG]``; a one-line error (naming the file's line where
    it can) where the file does not exist, does not run, has no ``get_config`` or returns
    something other than a ConfigDict."""
    file, colon, argument = path.partition(":")
    if not os.path.isfile(file):
        configs = sorted(os.path.relpath(p) for p in glob.glob(os.path.join(REPO_ROOT, "configs",
                                                                           "[!_]*.py")))
        exit_with_error(f"--config={path}: no such file (the configs here: "
                        f"{', '.join(configs)})")
    spec = importlib.util.spec_from_file_location("checked_config", file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        if not callable(getattr(module, "get_config", None)):
            exit_with_error(f"--config={path}: {file} defines no get_config() (a config file "
                            f"returns its ConfigDict from get_config, as configs/default.py)")
        config = module.get_config(*([argument] if colon else []))
    except Exception as error:  # the user's Python: where it failed, in one line
        message = error.msg if isinstance(error, SyntaxError) else _first_line(error)
        exit_with_error(f"--config={path}: {_where(error, file)}{type(error).__name__}: "
                        f"{message}")
    if not isinstance(config, ml_collections.ConfigDict):
        exit_with_error(f"--config={path}: get_config() returned a {type(config).__name__}; "
                        f"expected an ml_collections.ConfigDict")
    return config


def _where(error: Exception, file: str) -> str:
    """``"FILE:LINE: "`` of the deepest line of ``file`` in ``error``'s traceback (a
    SyntaxError's own position), or "" where the file is not in it."""
    if isinstance(error, SyntaxError) and error.lineno:
        return f"{error.filename or file}:{error.lineno}: "
    lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__)
             if os.path.abspath(frame.filename) == os.path.abspath(file)]
    return f"{file}:{lines[-1]}: " if lines else ""


def _flag_argument(argv: list[str], name: str) -> str | None:
    """The value of ``--name=VALUE`` or ``--name VALUE`` in ``argv`` (the last one), or None."""
    value = None
    for index, arg in enumerate(argv):
        match = re.fullmatch(rf"--?{name}(=(.*))?", arg)
        if match:
            value = match.group(2) if match.group(1) else (argv[index + 1:index + 2] or [None])[0]
    return value


def _check_overrides(config: ml_collections.ConfigDict, argv: list[str]) -> None:
    """A one-line error for the first ``--config.PATH`` of ``argv`` that ``config`` lacks."""
    for arg in argv:
        match = re.match(r"--?(?:no)?config\.([^=\s]+)", arg)
        if match:
            message = unknown_config_field(config, match.group(1))
            if message:
                exit_with_error(message)


def unknown_config_field(config: ml_collections.ConfigDict, path: str) -> str | None:
    """Why ``--config.<path>`` names no field of ``config`` (with the nearest field name), or
    None where it names one."""
    node, walked = config, []
    for part in path.split("."):
        name = part.split("[")[0]  # a list field's element, e.g. logical_axis_rules[0]
        if not isinstance(node, ml_collections.ConfigDict):
            return f"--config.{path}: {'.'.join(walked)}={node!r} is not a group of fields"
        if name not in node:
            close = difflib.get_close_matches(name, list(node.keys()), n=1)
            hint = f"; did you mean {'.'.join(walked + close)}?" if close else ""
            return (f"--config.{path}: unknown config field {'.'.join(walked + [name])!r}"
                    f"{hint} (configs/default.py lists the fields)")
        node = node[name]
        walked.append(name)
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with a bad flag (unknown, a value of the wrong type, a missing
    required one) or a stray argument as one line."""
    try:
        rest = flags.FLAGS(argv)
    except (flags.Error, TypeError, ValueError) as error:
        exit_with_error(_first_line(error))
    if len(rest) > 1:
        exit_with_error(f"unexpected arguments {rest[1:]}: flags are --NAME=VALUE")
    return rest


def run(main) -> None:
    """absl's ``app.run(main)`` with `parse_flags`, in a process whose large allocations use
    huge pages (see `restart_with_huge_pages`)."""
    restart_with_huge_pages()
    app.run(main, flags_parser=parse_flags)


_HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb"


def huge_pages_available() -> bool:
    """Whether this process's C library has glibc's huge-page tunable (glibc >= 2.35)."""
    library, version = platform.libc_ver()
    return (sys.platform == "linux" and library == "glibc"
            and tuple(int(part) for part in version.split(".")[:2]) >= (2, 35))


def restart_with_huge_pages() -> None:
    """Re-executes this process (same pid, same command line) once, with glibc's malloc asking
    for transparent huge pages (``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, glibc >= 2.35).

    XLA:CPU allocates each step's temporaries afresh, tens of MB and more, which glibc maps
    and unmaps every time, so the kernel faults them in 4 KiB at a time: 20,900 page faults
    and a third of a small model's step time on the 2-core CPU we measured. With huge pages
    the faults drop 300-fold and that step runs 1.6× as fast (bench/step.py). Does nothing
    where glibc lacks the tunable, or where ``GLIBC_TUNABLES`` already sets it (set
    ``glibc.malloc.hugetlb=0`` to opt out).
    """
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if not huge_pages_available() or _HUGE_PAGES_TUNABLE in tunables:
        return
    tunables = ":".join(filter(None, [tunables, f"{_HUGE_PAGES_TUNABLE}=1"]))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, {**os.environ, "GLIBC_TUNABLES": tunables})


# --- argparse (the bench scripts) ------------------------------------------------------------

class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line and exit status 1, as the other scripts'."""

    def error(self, message: str) -> None:
        exit_with_error(message)


def int_list(text: str) -> list[int]:
    """``"1024,4096"`` -> ``[1024, 4096]``, for an argparse ``type``."""
    try:
        return [int(value) for value in text.split(",") if value.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated ints") from None


# --- multi-process launch --------------------------------------------------------------------

def start_distributed(environ=None) -> None:
    """Joins a multi-process run where the launcher asks for one; does nothing otherwise.

    Call it before anything touches a device. The launch is read from ``environ`` (default
    ``os.environ``):

    * plain: ``JAX_COORDINATOR_ADDRESS=HOST:PORT`` (process 0's host; it serves there),
      ``JAX_NUM_PROCESSES=N`` and ``JAX_PROCESS_ID=0..N-1`` in each process;
    * SLURM (``srun``, ``SLURM_NTASKS`` > 1), Open MPI (``mpirun``, ``OMPI_COMM_WORLD_SIZE``
      > 1) or multi-host Cloud TPU: JAX's cluster detection finds the address, count and id
      (a ``JAX_*`` variable above overrides what it finds).

    CPU processes exchange collectives through gloo. ``JAX_INITIALIZATION_TIMEOUT`` (seconds,
    default 120) bounds the wait for the other processes and ``JAX_HEARTBEAT_TIMEOUT`` (default
    20) how long a dead process goes unnoticed: the others then exit non-zero rather than wait
    forever in a collective. Raises a one-line ValueError for a bad or inconsistent launch
    (a missing or bad count or id, a coordinator that does not answer in time, processes
    started with different counts).
    """
    import jax

    env = os.environ if environ is None else environ

    def integer(name, minimum, default=None):
        value = env.get(name)
        if value is None:
            return default
        try:
            number = int(value)
        except ValueError:
            number = None
        if number is None or number < minimum:
            raise ValueError(f"{name}={value!r}: expected an int >= {minimum}")
        return number

    address = env.get("JAX_COORDINATOR_ADDRESS") or None
    count = integer("JAX_NUM_PROCESSES", 1)
    index = integer("JAX_PROCESS_ID", 0)
    initialization_timeout = integer("JAX_INITIALIZATION_TIMEOUT", 1, 120)
    heartbeat_timeout = integer("JAX_HEARTBEAT_TIMEOUT", 1, 20)
    # What JAX's cluster detection (jax/_src/clusters) recognises as a multi-process launch.
    cluster = next((name for name, present in (
        ("SLURM", int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_NODELIST" in env),
        ("Open MPI", int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
         and "OMPI_MCA_orte_hnp_uri" in env),
        ("Cloud TPU", "," in env.get("TPU_WORKER_HOSTNAMES", ""))) if present), None)
    if cluster is None:
        given = {"JAX_COORDINATOR_ADDRESS": address, "JAX_NUM_PROCESSES": count,
                 "JAX_PROCESS_ID": index}
        if all(value is None for value in given.values()):
            return  # one process
        missing = [name for name, value in given.items() if value is None]
        if missing:
            set_ = ", ".join(f"{k}={v}" for k, v in given.items() if v is not None)
            raise ValueError(f"a multi-process launch needs JAX_COORDINATOR_ADDRESS (process "
                             f"0's HOST:PORT), JAX_NUM_PROCESSES and JAX_PROCESS_ID (0..N-1); "
                             f"{set_} came without {' and '.join(missing)}")
        if index >= count:
            raise ValueError(f"JAX_PROCESS_ID={index}: expected 0..{count - 1} "
                             f"(JAX_NUM_PROCESSES={count})")
    launch = (f"{cluster} launch" if cluster else
              f"process {index} of {count} with coordinator {address}")
    if index:  # JAX's client aborts the process where the coordinator does not answer
        _wait_for_coordinator(address, initialization_timeout, launch)
    try:
        # The heartbeat and shutdown timeouts stop a process whose peer died instead of
        # leaving it in a collective or the exit barrier for JAX's defaults (100 s, 300 s).
        jax.distributed.initialize(
            address, count, index, initialization_timeout=initialization_timeout,
            heartbeat_timeout_seconds=heartbeat_timeout,
            shutdown_timeout_seconds=heartbeat_timeout)
    except (RuntimeError, ValueError, TypeError) as error:  # XlaRuntimeError is a RuntimeError
        reason = _first_line(error)[:300]
        raise ValueError(f"{launch}: could not join the other processes ({reason}; "
                         f"JAX_INITIALIZATION_TIMEOUT={initialization_timeout} s): check that "
                         f"every process was started with the same coordinator address and "
                         f"process count") from None
    _check_same_launch(initialization_timeout)


def _wait_for_coordinator(address: str, timeout_seconds: int, launch: str) -> None:
    """Returns once ``HOST:PORT`` accepts connections; a one-line ValueError after
    ``timeout_seconds`` (process 0 starts its service there when it starts)."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_seconds
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1):
                return
        except (OSError, ValueError) as error:
            if time.monotonic() > deadline or isinstance(error, (ValueError, socket.gaierror)):
                raise ValueError(f"{launch}: the coordinator {address} did not answer within "
                                 f"JAX_INITIALIZATION_TIMEOUT={timeout_seconds} s ({error}); "
                                 f"start process 0 there, or fix JAX_COORDINATOR_ADDRESS") \
                    from None
        time.sleep(0.5)


def _check_same_launch(timeout_seconds: int) -> None:
    """Raises a one-line ValueError where the processes disagree on the process count (a
    process counting more peers than exist would otherwise wait for them at its first
    collective). Through JAX's coordination key-value store (jax 0.10 has no public API for
    it)."""
    import jax
    from jax._src import distributed

    state = distributed.global_state
    state.client.key_value_set(f"launch/num_processes/{state.process_id}",
                               str(state.num_processes))
    for peer in range(state.num_processes):
        try:
            theirs = state.client.blocking_key_value_get(f"launch/num_processes/{peer}",
                                                         timeout_seconds * 1000)
        except RuntimeError:
            theirs = "no answer"
        if theirs != str(state.num_processes):
            # Every process finds the disagreement: leaving together, none of them is stopped
            # by the coordination service for a peer that vanished before it could report.
            jax.distributed.shutdown()
            raise ValueError(f"process {state.process_id} was started with "
                             f"{state.num_processes} processes, process {peer} with {theirs}: "
                             f"give every process the same JAX_NUM_PROCESSES")
