"""SIGTERM and SIGINT (a preemption, Ctrl-C) as a request to save a checkpoint and stop after
the current step, agreed by all processes of a run."""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np


class StopSignal:
    """Within ``with StopSignal() as stop:``, SIGTERM/SIGINT set ``stop.received`` (the signal
    number) instead of ending the process; a second signal of the same kind acts as usual."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signum
        signal.signal(signum, self._previous[signum])

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
