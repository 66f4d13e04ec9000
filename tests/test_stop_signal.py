"""stop_signal.py: SIGTERM/SIGINT become a request to save and stop; the same signal delivered
twice at once (directly and by a multi-process supervisor) is one request; a later second one
acts as usual."""

import os
import signal

import pytest

import stop_signal
from stop_signal import StopSignal


def test_a_signal_delivered_twice_at_once_is_one_request():
    with StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # would end the process if it acted as usual
        assert stop.received == signal.SIGTERM
        assert stop.any_process_received()


def test_a_later_second_signal_acts_as_usual(monkeypatch):
    # raise_signal, not os.kill: a signal sent to the process may land on another thread
    # (XLA's, or one an earlier test in this worker left), and two that arrive before the main
    # thread runs Python's handler are handled once.
    monkeypatch.setattr(stop_signal, "_SAME_REQUEST_SECONDS", 0.0)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with StopSignal() as stop:
                signal.raise_signal(signal.SIGINT)
                assert stop.received == signal.SIGINT
                signal.raise_signal(signal.SIGINT)
        # Outside, the handlers are what they were.
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)
