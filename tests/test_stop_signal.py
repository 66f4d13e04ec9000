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
    monkeypatch.setattr(stop_signal, "_SAME_REQUEST_SECONDS", 0.0)
    with pytest.raises(KeyboardInterrupt):
        with StopSignal() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.received == signal.SIGINT
            os.kill(os.getpid(), signal.SIGINT)
    # Outside, the handlers are what they were.
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
