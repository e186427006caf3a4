"""core.stop: what a SIGTERM/SIGINT does inside and outside its deferred sections. The signals go
to a fresh Python of their own: sent to pytest's process they would reach whatever Ray and
TensorFlow installed there (a native failure handler for SIGTERM)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from core.stop import GracefulStop, Stopped
from tests.fixtures.crash import REPO, job_env

_PRELUDE = """
import os, signal, time
from core.stop import GracefulStop, Stopped, poll

def send(sig=signal.SIGINT):
    os.kill(os.getpid(), sig)
    time.sleep(0.05)  # the handler runs at the next bytecode boundary of the main thread

def raises(kind, fn):
    try:
        fn()
    except kind as exc:
        return exc
    raise AssertionError(f"{fn} did not raise {kind.__name__}")
"""


def _run(body: str) -> None:
    code = _PRELUDE + textwrap.dedent(body) + "\nprint('ok')\n"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=job_env(), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_a_signal_raises_stopped_and_the_handlers_are_restored():
    _run("""
        before = signal.getsignal(signal.SIGTERM)
        def stopped():
            with GracefulStop():
                send(signal.SIGTERM)
        assert "stopped by SIGTERM" in str(raises(Stopped, stopped))
        assert signal.getsignal(signal.SIGTERM) is before
    """)


def test_a_deferred_signal_is_recorded_and_raised_at_check():
    _run("""
        with GracefulStop() as stop:
            with stop.deferred():
                send()
                send()  # a commit is not cut short by impatience either
            assert stop.reason == "stopped by SIGINT"
            raises(Stopped, stop.check)
    """)


def test_a_second_signal_gives_up_a_wait_that_may_never_end():
    _run("""
        with GracefulStop() as stop, stop.deferred(second_interrupts=True):
            send()
            assert stop.reason == "stopped by SIGINT"
            raises(KeyboardInterrupt, send)
    """)


def test_poll_raises_again_a_stop_a_library_swallowed():
    _run("""
        with GracefulStop(polled=True):
            try:
                send(signal.SIGTERM)
            except Stopped:
                pass  # what TensorFlow's broad excepts do
            assert "SIGTERM" in str(raises(Stopped, poll))
        poll()  # no stop armed: nothing to raise
    """)


def test_why_tells_a_stop_from_a_failure():
    stop = GracefulStop()
    assert stop.why(KeyboardInterrupt()) == "stopped by SIGINT"  # a library's own Ctrl-C handling
    assert stop.why(SystemExit(1)) is None and stop.why(SystemExit(1), library_exits=True) == "stopped by SIGINT"
    assert stop.why(ValueError("a real failure")) is None
    stop.request("stopped by SIGTERM")
    assert stop.why(ValueError("what the stop left behind")) == "stopped by SIGTERM"


def test_a_stop_inside_ray_data_is_not_reported_as_a_ray_bug():
    """Ray Data logs any exception out of `iter_batches` as "Exception occurred in Ray Data or Ray
    Core internal code … open an issue on the Ray project", with a traceback: `breedlabel jobs
    stop` of a label job printed that whenever the signal landed in Ray Data's wait for a block.
    Ray's own decorator, with the label pipeline's filter: a stop is quiet, a real error is not."""
    import logging

    from ray.data.exceptions import omit_traceback_stdout

    from jobs.label_pipeline import _ray_data_quiet_on_stop

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("ray.data.exceptions")
    logger.addHandler(handler)

    @omit_traceback_stdout
    def raises(exc: Exception):
        raise exc

    try:
        with _ray_data_quiet_on_stop(), pytest.raises(Stopped):
            raises(Stopped("stopped by SIGTERM"))
        assert records == []
        with _ray_data_quiet_on_stop(), pytest.raises(ValueError):
            raises(ValueError("a real failure"))
        assert any("internal code" in r.getMessage() for r in records)
    finally:
        logger.removeHandler(handler)
