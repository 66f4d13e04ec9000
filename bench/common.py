"""What the benchmarks share: one point per process under a memory cap, and the timers (the
matmul rate they compare with is metrics.py's, the one behind train.py's MFU).

Each benchmark script re-runs itself with ``--point ...`` for every measurement, so that a
point's peak memory is its own and a point that cannot fit fails alone.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# How an allocation failure under the RLIMIT_DATA cap surfaces: XLA's own allocator,
# YNNPACK's matmul workspace, or Python.
_OUT_OF_MEMORY_MARKERS = ("RESOURCE_EXHAUSTED", "MemoryError", "bad_alloc", "Out of memory",
                          "out of memory", "allocate of", "YNNPACK operation failed")


def cap_memory(gib: float) -> int:
    """Caps this process's data segment (so its allocations fail instead of the machine's)."""
    cap = int(gib * 2**30)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    return cap


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def resident_bytes(field: str) -> int:
    """``field`` of /proc/self/status in bytes: ``VmRSS`` (resident now) or ``VmHWM`` (its
    peak since the process started or `reset_peak_resident`)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_resident() -> int:
    """Resets VmHWM to the resident size now (Linux's clear_refs), which it returns: the
    baseline of what a measured step adds to the peak."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return resident_bytes("VmRSS")


def xla_bytes(compiled) -> int:
    """What XLA's buffer assignment needs for a compiled step: arguments, outputs, temporaries."""
    memory = compiled.memory_analysis()
    return (memory.temp_size_in_bytes + memory.argument_size_in_bytes
            + memory.output_size_in_bytes)


def peak_bytes(compiled) -> int:
    """Peak device memory of a compiled step by XLA's buffer assignment: arguments, outputs
    and temporaries, with donated arguments that the outputs reuse counted once."""
    memory = compiled.memory_analysis()
    return xla_bytes(compiled) - memory.alias_size_in_bytes


def best_time(fn, repeats: int) -> float:
    """Seconds of the fastest of ``repeats`` calls of ``fn()`` (which blocks until done)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure_in_subprocess(script: str, point_args: list[str], label: dict, timeout: int,
                          memory_cap_gib: float) -> dict:
    """Runs ``script --point ...`` and returns the JSON row it prints last.

    Out of memory or time, returns ``label`` with a ``failed`` reason instead; any other
    failure raises with the point's output.
    """
    command = [sys.executable, script, *point_args, "--memory_cap_gib", str(memory_cap_gib)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO_ROOT, os.environ.get("PYTHONPATH", "")]))
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return label | {"failed": f"over {timeout} s"}
    if done.returncode != 0:
        text = done.stderr + done.stdout
        # A negative code is a signal: most likely the kernel's OOM killer.
        if done.returncode < 0 or any(m in text for m in _OUT_OF_MEMORY_MARKERS):
            return label | {"failed": f"out of memory (> {memory_cap_gib:g} GiB)"}
        raise RuntimeError(f"{label} failed:\n{text[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
