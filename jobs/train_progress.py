"""`breedlabel train --workers N` progress on the driver's console: one line per epoch.

Why: the workers' and the Train controller's own output (TensorFlow's C++ start-up lines in every
process, Ray Train's per-report INFO lines, Ray internals) stays in Ray's session logs unless -v,
so the driver prints the progress itself. The controller hands each report to the driver through
a small queue actor; a driver thread prints it while `trainer.fit()` blocks.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from typing import Iterator

from ray.train import UserCallback
from ray.util.queue import Empty, Queue

log = logging.getLogger(__name__)


class ReportToDriver(UserCallback):
    """On the Train controller: rank 0's metrics of each report, and worker failures, to `queue`."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue

    def after_report(self, run_context, metrics, checkpoint):
        self.queue.put(dict(metrics[0]) if metrics else {})

    def after_exception(self, run_context, worker_exceptions):
        errors = {rank: (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
                  for rank, exc in worker_exceptions.items()}
        self.queue.put({"errors": errors})


def describe(report: dict, epochs: dict[str, int]) -> str:
    """One line for a report: global epoch, phase epoch of planned, val and train top-1, speed."""
    if "errors" in report:
        failed = "; ".join(f"worker {rank}: {text}" for rank, text in sorted(report["errors"].items()))
        return f"{failed} (Ray Train restarts the workers from the last checkpoint if failures remain; -v shows why)"
    phase = report.get("phase", "?")
    where = f"{phase} {report.get('phase_epoch', 0) + 1}/{epochs.get(phase, '?')}"
    return (f"epoch {report.get('epoch', 0) + 1} ({where}): "
            f"val_top1 {report.get('val_top1', float('nan')):.4f}, top1 {report.get('top1', float('nan')):.4f}, "
            f"{report.get('images_per_s', 0):.0f} img/s")


@contextlib.contextmanager
def printed_progress(epochs: dict[str, int]) -> Iterator[ReportToDriver]:
    """A ReportToDriver callback for the trainer; its reports are logged here until the block ends."""
    queue = Queue(actor_options={"num_cpus": 0})
    stop = threading.Event()

    def pump() -> None:
        while not stop.is_set():
            try:
                log.info(describe(queue.get(timeout=1.0), epochs))
            except Empty:
                continue
            except Exception:  # noqa: BLE001 - the queue actor is gone: nothing more to print
                return

    thread = threading.Thread(target=pump, name="train-progress", daemon=True)
    thread.start()
    try:
        yield ReportToDriver(queue)
    finally:
        stop.set()
        thread.join(timeout=5)
        while not queue.empty():
            log.info(describe(queue.get_nowait(), epochs))
        queue.shutdown()
