"""Tune callbacks of `breedlabel tune`: one progress line per trial event, and an ended trial's
Ray Train resources given back whatever Ray's own cleaner managed.

Tune ends a trial by killing its actor, and with it the trial's Train controller, before the
controller removes its workers' placement group. Ray Train (2.60) leaves that to a detached
PlacementGroupCleaner that asks the dashboard's State API whether the controller died; when that
call fails (a busy 2-core machine, a slow or absent dashboard) the cleaner's thread dies, the
workers' CPUs stay reserved, and the next trial's workers wait for them forever ("worker group
startup timed out"). Every Train worker reports the placement group it runs in
(jobs.train_distributed.PG_METRIC); once its trial has ended, ReleaseEndedTrials removes it.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from ray.tune import Callback

from jobs.train_distributed import PG_METRIC

log = logging.getLogger(__name__)


def release_placement_group(pg_hex: str) -> bool:
    """Remove a placement group unless it is gone already; True when this call removed it."""
    from ray import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    pg = PlacementGroup(PlacementGroupID(bytes.fromhex(pg_hex)))
    if placement_group_table(pg).get("state", "REMOVED") == "REMOVED":
        return False
    remove_placement_group(pg)
    return True


class ReleaseEndedTrials(Callback):
    """Removes the placement group an ended trial's workers reported, GRACE_S after it ended:
    time for Tune to stop the trial's actor, so no live controller sees its workers vanish."""

    GRACE_S = 10.0

    def __init__(self) -> None:
        self.groups: dict[str, str] = {}  # trial id -> placement group hex
        self.ended: dict[str, float] = {}  # trial id -> monotonic time it ended

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get(PG_METRIC):
            self.groups[trial.trial_id] = result[PG_METRIC]

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.ended[trial.trial_id] = time.monotonic()

    def on_trial_error(self, iteration, trials, trial, **info):
        self.ended[trial.trial_id] = time.monotonic()

    def on_step_end(self, iteration, trials, **info):
        now = time.monotonic()
        for trial_id in [t for t, at in self.ended.items() if now - at >= self.GRACE_S]:
            del self.ended[trial_id]
            pg = self.groups.pop(trial_id, None)
            if pg and release_placement_group(pg):
                log.debug("gave back the workers' resources of ended trial %s (placement group %s)", trial_id, pg)


def release_search(grid) -> int:
    """After Tuner.fit (finished or interrupted): remove every placement group a trial of `grid`
    reported that is still there, so what runs next in this process (a restored search,
    --final-train) has the CPUs. Returns how many were removed."""
    groups = set()
    for result in grid:
        frame = result.metrics_dataframe
        if frame is not None and PG_METRIC in frame:
            groups.update(frame[PG_METRIC].dropna())
    return sum(release_placement_group(pg) for pg in groups)


class TrialProgress(Callback):
    """Our progress for a search, one line per trial event: trials started and ended out of the
    planned number, each epoch's val top-1 with the best so far, and a time estimate. (Tune's
    own tables and the workers' logs show with -v.)"""

    def __init__(self, num_samples: int, metric: str, epochs_of: Callable[[dict], int]) -> None:
        self.num_samples, self.metric, self.epochs_of = num_samples, metric, epochs_of
        self.t0, self.best = time.monotonic(), None
        self.ended: set[str] = set()
        self.restored: int | None = None  # trials a restored search had ended before this process
        self.epochs_run: dict[str, int] = {}

    def _catch_up(self, trials) -> None:
        """A restored search (--restore) starts with the trials it ended before the stop: count
        them, and their best value, so "N of M ended" and "best so far" hold across the stop."""
        if self.restored is not None:
            return
        self.t0 = time.monotonic()  # a restored Tuner unpickles this callback as it was created
        done = [t for t in trials if t.status in ("TERMINATED", "ERROR")]
        self.ended.update(t.trial_id for t in done)
        self.restored = len(done)
        for t in done:
            value = (getattr(t, "metric_analysis", {}).get(self.metric) or {}).get("max")
            if value is None:
                value = (t.last_result or {}).get(self.metric)
            if value is not None and (self.best is None or value > self.best[0]):
                self.best = (value, t.trial_id)

    def on_step_begin(self, iteration, trials, **info):
        self._catch_up(trials)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._catch_up(trials)
        params = ", ".join(f"{k}={_short(v)}" for k, v in (trial.config or {}).items())
        log.info("trial %s started (%d of %d): %s", trial.trial_id, len(trials), self.num_samples, params)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get(self.metric)
        if value is not None and (self.best is None or value > self.best[0]):
            self.best = (value, trial.trial_id)
        self.epochs_run[trial.trial_id] = int(result.get("training_iteration") or 0)
        best = f"; best so far {self.best[0]:.4f} ({self.best[1]})" if self.best else ""
        shown = "-" if value is None else f"{value:.4f}"
        log.info("trial %s epoch %d/%d: %s %s%s", trial.trial_id, self.epochs_run[trial.trial_id],
                 self.epochs_of(trial.config), self.metric, shown, best)

    def on_trial_complete(self, iteration, trials, trial, **info):
        run, planned = self.epochs_run.get(trial.trial_id, 0), self.epochs_of(trial.config)
        self._ended(trial, "finished" if run >= planned else f"stopped after {run} of {planned} epochs")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended(trial, f"FAILED (why: {trial.error_file})")

    def _ended(self, trial, how: str) -> None:
        self.ended.add(trial.trial_id)
        ended, here = len(self.ended), len(self.ended) - (self.restored or 0)
        elapsed = time.monotonic() - self.t0
        left = elapsed / max(here, 1) * (self.num_samples - ended)
        eta = f", about {left / 60:.0f} min left" if ended < self.num_samples else ""
        log.info("trial %s %s: %d of %d trials ended in %.1f min%s", trial.trial_id, how, ended,
                 self.num_samples, elapsed / 60, eta)


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
