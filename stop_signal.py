"""SIGTERM and SIGINT (a preemption, Ctrl-C) as a request to save a checkpoint and stop after
the current step, agreed by all processes of a run."""

from __future__ import annotations

import signal
import threading
import time

import jax
import numpy as np


# Within this many seconds, a second signal is the first delivered twice: a process under
# `launch.supervise_multi_process` gets a group's or a scheduler's signal both directly and
# from its supervisor.
_SAME_REQUEST_SECONDS = 2.0


class StopSignal:
    """Within ``with StopSignal() as stop:``, SIGTERM/SIGINT set ``stop.received`` (the signal
    number) instead of ending the process; a second signal of the same kind, more than
    `_SAME_REQUEST_SECONDS` later, acts as usual."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}
        self._received_at = 0.0

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received == signum:
            if time.monotonic() - self._received_at > _SAME_REQUEST_SECONDS:
                signal.signal(signum, self._previous[signum])
                signal.raise_signal(signum)  # acts as usual
            return
        self.received, self._received_at = signum, time.monotonic()

    def any_process_received(self) -> bool:
        """Whether any process of the run received a signal. All processes must stop at the
        same step, since they save the checkpoint together: with several processes this is a
        collective (an all-gather), which every process calls at every step."""
        if jax.process_count() == 1:
            return self.received is not None
        from jax.experimental import multihost_utils
        signals = multihost_utils.process_allgather(np.array(self.received or 0))
        if self.received is None and signals.max():
            self.received = int(signals.max())
        return self.received is not None

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
