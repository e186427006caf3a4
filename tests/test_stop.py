"""core.stop: what a SIGTERM/SIGINT does inside and outside its deferred sections (signals sent
to this very process, handled in the main thread where pytest runs)."""
from __future__ import annotations

import os
import signal
import time

import pytest

from core.stop import GracefulStop, Stopped, poll


def _signal(sig: int = signal.SIGINT) -> None:
    os.kill(os.getpid(), sig)
    time.sleep(0.05)  # the handler runs at the next bytecode boundary of the main thread


def test_a_signal_raises_stopped_and_the_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Stopped, match="stopped by SIGTERM"), GracefulStop():
        _signal(signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_deferred_signal_is_recorded_and_raised_at_check():
    with GracefulStop() as stop:
        with stop.deferred():
            _signal()
            _signal()  # a commit is not cut short by impatience either
        assert stop.reason == "stopped by SIGINT"
        with pytest.raises(Stopped):
            stop.check()


def test_a_second_signal_gives_up_a_wait_that_may_never_end():
    with GracefulStop() as stop, stop.deferred(second_interrupts=True):
        _signal()
        assert stop.reason == "stopped by SIGINT"
        with pytest.raises(KeyboardInterrupt):
            _signal()


def test_poll_raises_again_a_stop_a_library_swallowed():
    with GracefulStop(polled=True):
        try:
            _signal(signal.SIGTERM)
        except Stopped:
            pass  # what TensorFlow's broad excepts do
        with pytest.raises(Stopped, match="SIGTERM"):
            poll()
    poll()  # no stop armed: nothing to raise


def test_why_tells_a_stop_from_a_failure():
    stop = GracefulStop()
    assert stop.why(KeyboardInterrupt()) == "stopped by SIGINT"  # a library's own Ctrl-C handling
    assert stop.why(SystemExit(1)) is None and stop.why(SystemExit(1), library_exits=True) == "stopped by SIGINT"
    assert stop.why(ValueError("a real failure")) is None
    stop.request("stopped by SIGTERM")
    assert stop.why(ValueError("what the stop left behind")) == "stopped by SIGTERM"
