"""What a run reports: metrics.jsonl, TensorBoard events and the console (`MetricsLog`),
throughput and model FLOPs utilisation (`ThroughputMeter`, `peak_flops_per_device`), and the
float32 matmul rate that both MFU on a CPU and the benchmarks' "% of matmul" divide by
(`matmul_flops_per_second`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time

import jax
import ml_collections

from errors import UserError

# Dense bf16 peaks by device kind (vendor data sheets), the MFU denominator.
_PEAK_FLOPS = (("h100", 989e12), ("h200", 989e12), ("b200", 2250e12), ("a100", 312e12),
               ("v6 lite", 918e12), ("v6e", 918e12), ("v5 lite", 197e12), ("v5e", 197e12),
               ("v5p", 459e12), ("v4", 275e12))


def matmul_size() -> int:
    """The side of the timed matmul: 2048 on a CPU (on the 2-core machine it runs at the rate
    of 4096² in 1/6 of the time), 8192 on an accelerator (large enough to reach its rate)."""
    return 2048 if jax.default_backend() == "cpu" else 8192


def matmul_flops_per_second(repeats: int = 5) -> float:
    """The float32 rate (FLOP/s) of a ``(matmul_size(),) * 2`` matmul on the default device,
    best of ``repeats``."""
    import jax.numpy as jnp

    size = matmul_size()
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    jax.block_until_ready(matmul(a))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(matmul(a))
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_flops_per_device(config: ml_collections.ConfigDict) -> float:
    """The MFU denominator: ``config.peak_flops_per_device``, else the device kind's dense
    bf16 peak, else (CPU) `matmul_flops_per_second` measured now."""
    if config.peak_flops_per_device:
        return float(config.peak_flops_per_device)
    kind = jax.devices()[0].device_kind.lower()
    for name, flops in _PEAK_FLOPS:
        if name in kind:
            return flops
    return matmul_flops_per_second()


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; infinite for a line cut short by a killed run."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


class MetricsLog:
    """metrics.jsonl, TensorBoard events and the console, from process 0 only. A write of
    metrics.jsonl or a TensorBoard flush that fails (a full disk, a folder in the way) is a
    one-line `UserError`; the checkpoints stay. (tensorboardX writes events on a thread of its
    own, whose failures it prints itself.)"""

    def __init__(self, workdir: str, resume_step: int, total_steps: int):
        self.enabled = jax.process_index() == 0
        self._path = os.path.join(workdir, "metrics.jsonl")
        self._writer = self._bar = None
        if not self.enabled:
            return
        with self._writing():
            # Steps after the checkpoint we resume from were logged by the interrupted run and
            # are about to be run again: drop them so that each step appears once. Through a
            # new file, so that a failed write leaves the old log whole.
            if os.path.exists(self._path):
                with open(self._path) as f:
                    kept = [line for line in f if _logged_step(line) <= resume_step]
                try:
                    with open(self._path + ".new", "w") as f:
                        f.writelines(kept)
                    os.replace(self._path + ".new", self._path)
                finally:
                    if os.path.exists(self._path + ".new"):
                        os.remove(self._path + ".new")
            from tensorboardX import SummaryWriter
            self._writer = SummaryWriter(workdir)
        if sys.stderr.isatty():
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, initial=resume_step, unit="step",
                             dynamic_ncols=True)

    @contextlib.contextmanager
    def _writing(self):
        try:
            yield
        except OSError as error:
            raise UserError(f"writing the logs in {os.path.dirname(self._path)} failed "
                            f"({type(error).__name__}: {error.strerror or error}); the "
                            f"checkpoints saved so far are kept: free space (or fix the "
                            f"folder) and run the same command to resume") from None

    def write(self, step: int, scalars: dict, text: dict | None = None) -> None:
        if not self.enabled:
            return
        with self._writing():
            for name, value in scalars.items():
                self._writer.add_scalar(name, value, step)
            for name, value in (text or {}).items():
                self._writer.add_text(name, value, step)
            with open(self._path, "a") as f:
                f.write(json.dumps({"step": step, **scalars}) + "\n")
            self._writer.flush()

    def progress(self, step: int, summary: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix_str(summary, refresh=True)
        else:
            print(f"step {step}: {summary}", flush=True)

    def message(self, text: str) -> None:
        if self.enabled:
            (self._bar.write if self._bar is not None else print)(text)

    def close(self, quietly: bool = False) -> None:
        """Closes the writers; ``quietly``: a failure raises nothing (another error is on its
        way out, which it must not replace)."""
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            try:
                with self._writing():
                    self._writer.close()
            except ValueError:
                if not quietly:
                    raise


class ThroughputMeter:
    """The logged throughput of the steps since the last `report`: wall time (evaluation left
    out), time in the jitted step, and tokens."""

    def __init__(self, flops_per_step: float, peak_flops: float):
        self._flops_per_step, self._peak_flops = flops_per_step, peak_flops
        self._restart()

    def _restart(self) -> None:
        self._since = time.perf_counter()
        self._steps, self._step_seconds, self._tokens = 0, 0.0, 0.0

    def add_step(self, step_seconds: float, tokens: float) -> None:
        self._steps += 1
        self._step_seconds += step_seconds
        self._tokens += tokens

    def leave_out(self, seconds: float) -> None:
        self._since += seconds

    def report(self) -> dict:
        """The rates since the last report (or the start); starts a new window (the time
        spent logging them counts in the next one)."""
        elapsed = time.perf_counter() - self._since
        seconds_per_step = elapsed / self._steps
        rates = {"tokens_per_second": self._tokens / elapsed,
                 "mfu": self._flops_per_step / seconds_per_step / self._peak_flops,
                 "seconds_per_step": seconds_per_step,
                 # Host time outside the jitted step: data, checkpoint calls, logging.
                 "overhead_fraction": 1.0 - self._step_seconds / elapsed}
        self._restart()
        return rates
