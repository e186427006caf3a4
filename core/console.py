"""What reaches the terminal: our progress, our summary, and warnings a user must act on.

Libraries talk a lot that asks nothing of the user: TensorFlow's C++ start-up lines (absl's
"All log messages before absl::InitializeLog()", oneDNN, "failed call to cuInit … (303)" on a
machine without a GPU), which reach file descriptor 2 before TF_CPP_MIN_LOG_LEVEL applies, and
INFO logs of absl, tensorflow and Ray. By default those go to a log file or stay in Ray's session
logs; `breedlabel -v` (BREEDLABEL_VERBOSE=1, which Ray workers inherit) lets everything through.
No TensorFlow or Ray import at module level: the CLI imports this for `--help`.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, TextIO

from core import stop

VERBOSE_ENV = "BREEDLABEL_VERBOSE"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# loggers whose INFO/WARNING lines are for library developers; ERROR still shows
LIBRARY_LOGGERS = ("absl", "tensorflow", "h5py", "matplotlib", "PIL", "urllib3", "filelock", "optuna", "botocore",
                   "boto3", "s3transfer")
TF_LOG = "tensorflow.log"

log = logging.getLogger(__name__)


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def configure(verbose: bool) -> None:
    """Once per process, before TensorFlow or Ray start: our INFO lines, libraries' errors only
    (everything with `verbose`). Sets the environment Ray workers and subprocesses inherit."""
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    if not verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=LOG_FORMAT)
    quiet_libraries()


def quiet_libraries() -> None:
    """Library loggers to ERROR unless verbose; also what a Ray worker calls for itself."""
    if is_verbose():
        return
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def quiet_logger(name: str, enabled: bool = True) -> Iterator[None]:
    """A logger shows only errors while the block runs."""
    quiet = logging.getLogger(name)
    level = quiet.level
    if enabled:
        quiet.setLevel(logging.ERROR)
    try:
        yield
    finally:
        quiet.setLevel(level)


def default_log_dir() -> Path:
    """Where start-up chatter goes when a run has no folder of its own."""
    return Path(tempfile.gettempdir()) / "breedlabel-logs"


@contextlib.contextmanager
def stdout_to_log(name: str) -> Iterator[None]:
    """sys.stdout appends to <default log dir>/<name> while the block runs, unless verbose: for a
    library that prints to stdout whatever its verbosity (Tune's experiment table), when stdout
    is for our summary."""
    if is_verbose():
        yield
        return
    path = default_log_dir() / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as out, contextlib.redirect_stdout(out):
        yield


@contextlib.contextmanager
def native_stderr_to(path: str | os.PathLike | None) -> Iterator[None]:
    """File descriptor 2 appends to `path` while the block runs (C++ libraries write there
    directly, so sys.stderr alone cannot catch them); None = leave it alone."""
    if path is None:
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(target, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(target)


@contextlib.contextmanager
def native_output_to_log(name: str) -> Iterator[Path | None]:
    """Native libraries' writes to file descriptor 2 (Ray's C++ core worker: "E … core_worker.cc",
    absl, TensorFlow) append to <default log dir>/<name> while the block runs; Python's
    sys.stderr and the logging handlers keep writing to the terminal. Nothing changes when
    verbose. Yields the log file's path (None when verbose)."""
    if is_verbose():
        yield None
        return
    path = default_log_dir() / name
    old, terminal, handlers = _python_stderr_to_terminal()
    try:
        with native_stderr_to(path):
            yield path
    finally:
        sys.stderr = old
        for handler in handlers:
            handler.setStream(old)
        terminal.close()


def _python_stderr_to_terminal() -> tuple[TextIO, TextIO, list[logging.StreamHandler]]:
    """Point sys.stderr and the logging handlers that wrote to it at a copy of file descriptor 2
    as it is now (the terminal), before fd 2 itself is pointed at a log; returns (the old
    sys.stderr, the copy, the handlers moved) for whoever puts them back."""
    old = sys.stderr
    old.flush()
    terminal = os.fdopen(os.dup(2), "w", buffering=1, encoding=getattr(old, "encoding", None) or "utf-8",
                         errors="backslashreplace")
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, logging.StreamHandler) and h.stream is old]
    sys.stderr = terminal
    for handler in handlers:
        handler.setStream(terminal)
    return old, terminal, handlers


def native_output_to_log_until_exit(name: str) -> Path | None:
    """`native_output_to_log` for the rest of the process: for a command that has said its last
    line and is shutting Ray down. Ray Data's threads still running after a stop call into the
    core worker Ray has shut down, and its C++ then logs "The core worker has already been
    shutdown" to file descriptor 2, after (under) the command's one-line message."""
    if is_verbose():
        return None
    path = default_log_dir() / name
    path.parent.mkdir(parents=True, exist_ok=True)
    _python_stderr_to_terminal()  # for good: nothing is put back
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(target, 2)
    os.close(target)
    return path


@contextlib.contextmanager
def tensorflow_startup(log_dir: str | os.PathLike | None = None) -> Iterator[None]:
    """Around `import tensorflow` and what first initialises its runtime (device discovery, where
    cuInit runs, or a distribution strategy): their C++ start-up lines are appended to
    <log_dir>/tensorflow.log unless verbose. On a machine with an NVIDIA device where TensorFlow
    finds no GPU those lines explain why, so they are shown after all."""
    path = None if is_verbose() else Path(log_dir or default_log_dir()) / TF_LOG
    start = path.stat().st_size if path is not None and path.exists() else 0
    with native_stderr_to(path):
        yield
    import tensorflow as tf

    if path is not None and Path("/dev/nvidia0").exists() and not tf.config.list_physical_devices("GPU"):
        with open(path, errors="replace") as f:
            f.seek(start)
            lines = f.read().strip()
        print(f"breedlabel: this machine has an NVIDIA device but TensorFlow found no GPU (it runs on the CPU); "
              f"its start-up log ({path}):\n{lines}", file=sys.stderr)


def import_tensorflow(log_dir: str | os.PathLike | None = None):
    """`import tensorflow` and its device discovery inside tensorflow_startup; returns the module."""
    with tensorflow_startup(log_dir):
        import tensorflow as tf

        tf.config.list_physical_devices("GPU")
    return tf


class Progress:
    """Counts, rate and time left for a long step: a tqdm bar on a terminal, else (a log file, a
    CI console, a Ray worker) a log line every tenth of the way (and at least every `every_s`
    seconds), so no step is silent for minutes. `total` may grow while the step runs (a listing
    still going on): `grow(total)`."""

    def __init__(self, total: int, desc: str, unit: str = "img", every_s: float = 60.0,
                 report_total: bool = True) -> None:
        self.total, self.desc, self.unit, self.done, self.report_total = int(total), desc, unit, 0, report_total
        self.t0, self.next_log, self.every_s, self.last_log = time.monotonic(), 0.1, every_s, time.monotonic()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                            smoothing=0.1, leave=False)

    def grow(self, total: int, postfix: str = "") -> None:
        self.total = max(self.total, int(total))
        if self.bar is not None:
            self.bar.total = self.total
            self.bar.set_postfix_str(postfix, refresh=False)

    def update(self, n: int) -> None:
        stop.poll()  # a long step is where a swallowed SIGTERM must get its second chance
        self.done += int(n)
        if self.bar is not None:
            self.bar.update(n)
        elif self.total and self.done < self.total and (self.done / self.total >= self.next_log
                                                         or time.monotonic() - self.last_log >= self.every_s):
            self.last_log = time.monotonic()
            elapsed = time.monotonic() - self.t0
            rate = self.done / max(elapsed, 1e-9)
            log.info("%s: %d/%d %s (%.1f %s/s, about %s left)", self.desc, self.done, self.total, self.unit, rate,
                     self.unit, _clock((self.total - self.done) / max(rate, 1e-9)))
            self.next_log = math.floor(self.done / self.total * 10 + 1) / 10

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if not self.report_total:
            return
        elapsed = time.monotonic() - self.t0
        log.info("%s: %d %s in %s (%.1f %s/s)", self.desc, self.done, self.unit, _clock(elapsed),
                 self.done / max(elapsed, 1e-9), self.unit)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _clock(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds >= 60 else f"{seconds} s"
