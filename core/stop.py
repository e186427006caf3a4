"""Stop a run cleanly on SIGTERM and SIGINT (Ctrl-C, `kill`, `breedlabel jobs stop`, a scheduler).

`ray job stop` sends SIGTERM to the job's driver and SIGKILLs it 3 s later
(RAY_JOB_STOP_WAIT_TIME_S), so the stop path must be short: stage the rows already received,
release the output's lease, exit 1 with one line. Ray's own driver handler (`sys.exit` from
anywhere) is replaced while a run holds its output, and restored after.

Critical sections (the commit, the clean-up after a stop) run under `deferred()`: a signal
there is recorded, not raised, so a stop never leaves a half-made commit or a held lease.

A `Stopped` raised by the handler can land where library code swallows it (a weakref callback,
a broad `except` in TensorFlow), so a run that must not carry on after a stop also polls:
`poll()` — called at every progress step and every Keras batch — raises again for the
innermost armed stop that asked for it (`GracefulStop(polled=True)`).
"""
from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Callable, Iterator

from core.errors import BreedlabelError

log = logging.getLogger(__name__)
_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_polled: list["GracefulStop"] = []


class Stopped(BreedlabelError):
    """The run was asked to stop (a signal, or a lost lease); what it labelled is staged."""


class GracefulStop:
    """Context manager: turns SIGTERM/SIGINT into `Stopped`, raised in the main thread."""

    def __init__(self, *, polled: bool = False, sigterm_as_sigint: bool = False,
                 announce: Callable[[str], None] | None = None) -> None:
        self.reason: str | None = None
        # said at the first signal, before the slow part of stopping: `ray job stop` SIGKILLs the
        # driver 3 s after its SIGTERM, and a search's trials take longer than that to end
        self.announce = announce
        self.polled = polled
        # a library that handles SIGINT itself (Ray Train aborts its controller and returns from
        # fit) gets SIGTERM the same way; `poll()` afterwards turns the early return into Stopped
        self.sigterm_as_sigint = sigterm_as_sigint
        self._deferring = 0
        self._second_interrupts: list[bool] = []
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "GracefulStop":
        return self.arm()

    def arm(self) -> "GracefulStop":
        """Install the handlers (again: `ray.init` replaces the SIGTERM one). Main thread only."""
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                previous = signal.signal(sig, self._on_signal)
                self._previous.setdefault(sig, previous)
        if self.polled and self not in _polled:
            _polled.append(self)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()
        if self in _polled:
            _polled.remove(self)

    def request(self, reason: str) -> None:
        """Ask the run to stop (from any thread, e.g. the lease renewal); seen at `check()`."""
        self.reason = self.reason or reason

    def check(self) -> None:
        if self.reason is not None:
            raise Stopped(self.reason)

    def why(self, exc: BaseException, *, library_exits: bool = False) -> str | None:
        """Why `exc` ended the run if a stop did, else None (a failure: re-raise it). A Ctrl-C that
        a library's own SIGINT handler took (KeyboardInterrupt, or with `library_exits` the
        SystemExit of Ray Train and Tune, which end their fit on SIGINT) reads as ours would."""
        if self.reason is not None:
            return self.reason
        if isinstance(exc, KeyboardInterrupt) or (library_exits and isinstance(exc, SystemExit)):
            return f"stopped by {signal.SIGINT.name}"
        return None

    def warn_if_finished_anyway(self, what: str) -> None:
        """A stop the last step swallowed (an export that finished): say what is whole, exit 0."""
        if self.reason is not None:
            log.warning("%s as %s", self.reason, what)

    def finish(self) -> None:
        """The run's work is whole (published): until the block ends, signals are only noted, as
        in `deferred()`; `warn_if_finished_anyway` says so afterwards. A SIGTERM while the lease
        was released or Ray shut down killed the process (143) with the run already published."""
        self._deferring += 1
        self._second_interrupts.append(False)

    @contextlib.contextmanager
    def deferred(self, *, second_interrupts: bool = False) -> Iterator[None]:
        """Signals inside are recorded, not raised (`check()` afterwards where it matters).

        second_interrupts: a second signal raises KeyboardInterrupt, for a wait that may never end
        (Ray connecting to a cluster that does not answer), not for a commit."""
        self._deferring += 1
        self._second_interrupts.append(second_interrupts)
        try:
            yield
        finally:
            self._deferring -= 1
            self._second_interrupts.pop()

    def _on_signal(self, signum: int, frame) -> None:
        first = self.reason is None
        self.request(f"stopped by {signal.Signals(signum).name}")
        if first and self.announce is not None:
            self.announce(self.reason)
        if self._deferring:
            if not first and self._second_interrupts[-1]:
                raise KeyboardInterrupt  # a second signal while waiting: give up waiting
            return
        sigint = signal.getsignal(signal.SIGINT)
        if self.sigterm_as_sigint and signum == signal.SIGTERM and callable(sigint) and sigint != self._on_signal:
            sigint(signal.SIGINT, frame)
            return
        if first:
            raise Stopped(self.reason)
        raise KeyboardInterrupt  # a second signal while stopping: give up waiting


def poll() -> None:
    """Raise `Stopped` if the innermost polled stop was asked to stop (not inside `deferred()`):
    the second chance for a signal whose first `Stopped` a library swallowed."""
    if (_polled and _polled[-1].reason is not None and not _polled[-1]._deferring
            and threading.current_thread() is threading.main_thread()):
        raise Stopped(_polled[-1].reason)


def ignore_signals() -> dict[int, object]:
    """SIGTERM and SIGINT ignored from now on (main thread only); returns the handlers they had.
    For a process that has stopped and said so, or the part of its exit no signal may cut."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, signal.SIG_IGN) for sig in _SIGNALS}


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """`ignore_signals()` for the block, then the handlers of before."""
    previous = ignore_signals()
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]


@contextlib.contextmanager
def sigint_handler_restored() -> Iterator[None]:
    """Ray Train and Tune install a SIGINT handler of their own for a fit and leave it there; put
    back the one before, so a stop after the fit (the export, the final training) is ours again."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
