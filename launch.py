"""How a script's process starts: re-executed once with huge pages for glibc's malloc, and
joined to the other processes of a multi-process run (``jax.distributed``), under a
supervisor that reports the run's end in one line when the collectives abort the process.

A bad launch (a missing or bad count or id, a coordinator that does not answer, processes
started with different counts) is a one-line `UserError`, which the scripts print as their
other one-line errors (cli.exit_with_error).
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from errors import UserError, first_line

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


# Set in a supervised process: the file where it notes that it joined the other processes.
_SUPERVISED = "LOCAL_ATTENTION_LM_JOINED_FILE"
# gloo's note for each collective context it sets up (a dozen per run): noise, not news.
# Several threads print them at once, so a line may hold pieces of several: any line with a
# piece goes.
_GLOO_CONNECTED = re.compile(r"\[Gloo\]|peer ranks")
_FATAL = re.compile(r"^(F\d{4} |Fatal Python error)")


# Under jax 0.12, a collective or barrier whose peer process died raises where older jax
# aborted the process: JaxRuntimeError "Gloo AllGather failed: ... Connection reset by peer",
# or "Barrier failed because: ... Task 1 heartbeat timeout. This indicates that ...".
_COLLECTIVE_FAILED = re.compile(r"Gloo \w+ failed|heartbeat timeout")


def lost_peer_message(error: BaseException) -> str | None:
    """The one-line error for ``error`` where it is a collective of a multi-process run that
    failed because another process is gone (killed, crashed, its host down), else None: the
    survivor says so and how to resume, as the supervisor does for an abort
    (`supervise_multi_process`), rather than blaming what it was doing (a checkpoint save)."""
    launch = _multi_process_launch(os.environ)
    if launch is None or type(error).__name__ != "JaxRuntimeError" \
            or not _COLLECTIVE_FAILED.search(str(error)):
        return None
    reason = first_line(error).split(". ")[0]  # jax's advice after it is not ours
    return (f"{launch} stopped: another process of the run was lost ({reason}); "
            f"the checkpoints in the workdir are whole: run the same command again in every "
            f"process to resume")


def _multi_process_launch(env) -> str | None:
    """"process I of N" where ``env`` asks for a multi-process run, else None."""
    count = env.get("JAX_NUM_PROCESSES") or env.get("SLURM_NTASKS") \
        or env.get("OMPI_COMM_WORLD_SIZE")
    if not (count or "").isdigit() or int(count) < 2:
        return None
    index = env.get("JAX_PROCESS_ID") or env.get("SLURM_PROCID") \
        or env.get("OMPI_COMM_WORLD_RANK") or "?"
    return f"process {index} of {count}"


def supervise_multi_process() -> None:
    """In a multi-process launch, runs this script again as a child and reports how it ended.

    JAX's collectives abort a process (SIGABRT, no word) when a peer dies or when the peers
    never all join; the supervisor turns that into one line saying which it was and what to
    do, with exit status 1. It passes SIGTERM and SIGINT on (the child saves a checkpoint and
    stops), drops gloo's "connected" notes from the child's stderr, and takes the child down
    with it if it is killed itself. Returns at once in a single-process run and in the child.
    """
    launch = _multi_process_launch(os.environ)
    if launch is None or _SUPERVISED in os.environ:
        return
    joined = tempfile.NamedTemporaryFile(prefix="joined-", delete=False)
    joined.close()
    child = subprocess.Popen(sys.orig_argv, executable=sys.executable, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env={**os.environ, _SUPERVISED: joined.name},
                             text=True, preexec_fn=_die_with_parent)
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda number, _: child.send_signal(number))
    crash: list[str] = []  # the child's dying words: a fatal log, stacks
    relays = [threading.Thread(target=_relay, args=(stream, target, held), daemon=True)
              for stream, target, held in ((child.stdout, sys.stdout, None),
                                           (child.stderr, sys.stderr, crash))]
    for relay in relays:
        relay.start()
    code = child.wait()
    for relay in relays:
        relay.join()
    if crash and code >= 0:
        sys.stderr.writelines(crash)
    with open(joined.name) as f:
        had_joined = f.read() == "joined"
    os.unlink(joined.name)
    if code < 0:
        how = signal.Signals(-code).name
        if crash:
            with tempfile.NamedTemporaryFile("w", prefix="crash-", suffix=".log",
                                             delete=False) as f:
                f.writelines(crash)
            how += f"; its log: {f.name}"
        heartbeat = os.environ.get("JAX_HEARTBEAT_TIMEOUT", "20")
        initialization = os.environ.get("JAX_INITIALIZATION_TIMEOUT", "120")
        if had_joined:
            print(f"error: {launch} stopped ({how}): another process of the run was lost or "
                  f"stopped answering (JAX_HEARTBEAT_TIMEOUT={heartbeat} s); the checkpoints "
                  f"in the workdir are whole: run the same command again in every process to "
                  f"resume", file=sys.stderr)
        else:
            print(f"error: {launch} stopped ({how}) before every process joined (within "
                  f"JAX_INITIALIZATION_TIMEOUT={initialization} s): start all of them, with the "
                  f"same JAX_NUM_PROCESSES and coordinator address", file=sys.stderr)
        code = 1
    sys.exit(code)


def _relay(stream, target, held: list | None) -> None:
    """Copies the child's ``stream`` to ``target`` line by line, without gloo's notes; from a
    fatal log line (absl's ``F...``, Python's "Fatal Python error") on, into ``held`` instead
    (where given), for the supervisor to file away."""
    for line in stream:
        if held is not None and (held or _FATAL.match(line)):
            held.append(line)
            continue
        if not _GLOO_CONNECTED.search(line):
            target.write(line)
            target.flush()


def _die_with_parent() -> None:
    """In the child: SIGKILL when the supervisor dies (Linux's PR_SET_PDEATHSIG), so that
    killing a process of the run kills all of it."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux
        pass


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
    forever in a collective. Raises a one-line `UserError` for a bad or inconsistent launch
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
            raise UserError(f"{name}={value!r}: expected an int >= {minimum}")
        return number

    address = env.get("JAX_COORDINATOR_ADDRESS") or None
    count = integer("JAX_NUM_PROCESSES", 1)
    index = integer("JAX_PROCESS_ID", 0)
    initialization_timeout = integer("JAX_INITIALIZATION_TIMEOUT", 1, 120)
    heartbeat_timeout = integer("JAX_HEARTBEAT_TIMEOUT", 1, 20)
    # What JAX's cluster detection (jax/_src/clusters) recognises as a multi-process launch.
    cluster = next((name for name, present in (
        ("SLURM", integer("SLURM_NTASKS", 1, 1) > 1 and "SLURM_STEP_NODELIST" in env),
        ("Open MPI", integer("OMPI_COMM_WORLD_SIZE", 1, 1) > 1
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
            raise UserError(f"a multi-process launch needs JAX_COORDINATOR_ADDRESS (process "
                            f"0's HOST:PORT), JAX_NUM_PROCESSES and JAX_PROCESS_ID (0..N-1); "
                            f"{set_} came without {' and '.join(missing)}")
        if index >= count:
            raise UserError(f"JAX_PROCESS_ID={index}: expected 0..{count - 1} "
                            f"(JAX_NUM_PROCESSES={count})")
        host, colon, port = address.rpartition(":")
        if not (colon and host and port.isdigit() and 0 < int(port) < 2**16):
            raise UserError(f"JAX_COORDINATOR_ADDRESS={address!r}: expected HOST:PORT, process "
                            f"0's host and a free port on it")
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
        reason = first_line(error)[:300]
        raise UserError(f"{launch}: could not join the other processes ({reason}; "
                        f"JAX_INITIALIZATION_TIMEOUT={initialization_timeout} s): check that "
                        f"every process was started with the same coordinator address and "
                        f"process count") from None
    _check_same_launch(initialization_timeout)
    if env.get(_SUPERVISED):
        with open(env[_SUPERVISED], "w") as f:
            f.write("joined")


def _wait_for_coordinator(address: str, timeout_seconds: int, launch: str) -> None:
    """Returns once ``HOST:PORT`` accepts connections; a one-line `UserError` after
    ``timeout_seconds`` (process 0 starts its service there when it starts)."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_seconds
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1):
                return
        except (OSError, ValueError) as error:
            if time.monotonic() > deadline or isinstance(error, (ValueError, socket.gaierror)):
                raise UserError(f"{launch}: the coordinator {address} did not answer within "
                                f"JAX_INITIALIZATION_TIMEOUT={timeout_seconds} s ({error}); "
                                f"start process 0 there, or fix JAX_COORDINATOR_ADDRESS") \
                    from None
        time.sleep(0.5)


def _check_same_launch(timeout_seconds: int) -> None:
    """Raises a one-line `UserError` where the processes disagree on the process count (a
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
            raise UserError(f"process {state.process_id} was started with "
                            f"{state.num_processes} processes, process {peer} with {theirs}: "
                            f"give every process the same JAX_NUM_PROCESSES")
