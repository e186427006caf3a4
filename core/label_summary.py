"""Running counts of a labelling run, its manifest, its closing summary and its exit code.

The run manifest is the truth a scheduler acts on (DESIGN.md): 0 = done, 3 = done but the error
rate exceeded --max-error-rate (every row still written), 1 = failed (no manifest at all).
"""
from __future__ import annotations

import collections
import datetime as _dt
import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from core import output, schema
from core.errors import EXIT_ERROR_BUDGET, EXIT_FAILED, EXIT_OK


MIN_TIMED_S = 5.0  # below this, the arrival times of the rows say more about buffering than speed


@dataclass
class RunStats:
    """Accumulates per-batch figures on the driver; memory is O(classes + error kinds)."""

    min_prob: float = 0.5
    images: int = 0
    labelled: int = 0
    skipped: int = 0
    still_unreadable: collections.Counter = field(default_factory=collections.Counter)  # reason -> inputs
    low_confidence: int = 0
    not_dogs: int = 0
    dog_scored: bool = False  # some row had a dog score (the bundle has one)
    errors_by_kind: collections.Counter = field(default_factory=collections.Counter)
    breeds: collections.Counter = field(default_factory=collections.Counter)
    started: float = field(default_factory=time.monotonic)
    started_at: str = field(default_factory=lambda: _now())
    first_row_at: float | None = None   # monotonic time the first labelled rows arrived
    first_rows: int = 0                 # ... and how many
    busy_s: float = 0.0                 # seconds the actors spent on the chunks (read, decode, infer)

    def add(self, rows: pa.Table, skipped: int = 0, *, resumed: bool = False) -> None:
        """Count `rows`; `resumed`: rows an interrupted attempt staged, read back at the start of
        this one: counted, but not timed (the start-up and the rate are this attempt's)."""
        self.skipped += skipped
        if rows.num_rows == 0:
            return
        if self.first_row_at is None and not resumed:
            self.first_row_at, self.first_rows = time.monotonic(), rows.num_rows
        self.images += rows.num_rows
        errors = rows.column(schema.ERROR)
        ok = pc.is_null(errors)
        n_ok = int(pc.sum(ok).as_py() or 0)
        self.labelled += n_ok
        if n_ok < rows.num_rows:
            for item in pc.value_counts(errors.drop_null()).to_pylist():
                self.errors_by_kind[item["values"]] += item["counts"]
        if n_ok:
            for item in pc.value_counts(rows.column(schema.BREED).drop_null()).to_pylist():
                self.breeds[item["values"]] += item["counts"]
            probs = rows.column(schema.PROB)
            self.low_confidence += int(pc.sum(pc.less(probs.drop_null(), self.min_prob)).as_py() or 0)
            is_dog = rows.column(schema.IS_DOG).drop_null()
            if len(is_dog):
                self.dog_scored = True
                self.not_dogs += int(pc.sum(pc.invert(is_dog)).as_py() or 0)

    @property
    def errors(self) -> int:
        return self.images - self.labelled

    @property
    def wall_s(self) -> float:
        return time.monotonic() - self.started

    def img_per_s(self, fresh: int) -> float:
        """The labelling rate, start-up excluded: rows after the first batch over the time since it
        came (Ray start, actor start and model load are not labelling); for a run too short to
        time that way (one batch, or the rest within a few seconds), its rows over the time the
        actors spent on them."""
        since = time.monotonic() - self.first_row_at if self.first_row_at is not None else 0.0
        if fresh > self.first_rows and since >= MIN_TIMED_S:
            return (fresh - self.first_rows) / since
        return fresh / self.busy_s if self.busy_s > 0 else 0.0

    def error_rate(self) -> float:
        return self.errors / self.images if self.images else 0.0


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def exit_code(manifest: dict | None) -> int:
    """0/3 from a finished run's manifest; no manifest means the run failed (1)."""
    if not manifest or manifest.get(output.M_STATUS) != output.STATUS_COMPLETE:
        return EXIT_FAILED
    limit = manifest.get(output.M_MAX_ERROR_RATE)
    if limit is not None and manifest.get(output.M_ERROR_RATE, 0.0) > float(limit):
        return EXIT_ERROR_BUDGET
    return EXIT_OK


def build_manifest(stats: RunStats, *, run_id: str, model_id: str, runtime: str, inputs: list[str],
                   max_error_rate: float | None, attempts: int, resumed_rows: int, config: dict,
                   startup_s: float | None = None) -> dict:
    """Everything a scheduler or an operator asks about a finished run (files are added at commit)."""
    wall = stats.wall_s
    total = stats.images  # includes the rows of an interrupted attempt, read back on resume
    fresh = total - resumed_rows
    manifest = {
        output.M_RUN_ID: run_id, output.M_STATUS: output.STATUS_COMPLETE, output.M_MODEL_ID: model_id,
        output.M_RUNTIME: runtime, output.M_INPUTS: inputs, output.M_IMAGES: total,
        output.M_LABELLED: stats.labelled, output.M_ERRORS: stats.errors,
        output.M_ERRORS_BY_KIND: dict(stats.errors_by_kind.most_common()),
        output.M_SKIPPED: stats.skipped, output.M_RESUMED: resumed_rows,
        output.M_STILL_UNREADABLE: dict(stats.still_unreadable.most_common()),
        output.M_LOW_CONFIDENCE: stats.low_confidence,
        output.M_NOT_DOGS: stats.not_dogs if stats.dog_scored else None,
        output.M_BREEDS: dict(stats.breeds.most_common()),
        output.M_IMG_PER_S: round(stats.img_per_s(fresh), 2),
        output.M_WALL_S: round(wall, 3),
        output.M_STARTUP_S: None if startup_s is None else round(startup_s, 3),
        output.M_STARTED_AT: stats.started_at, output.M_FINISHED_AT: _now(),
        output.M_ERROR_RATE: round(stats.error_rate(), 6), output.M_MAX_ERROR_RATE: max_error_rate,
        output.M_ATTEMPTS: attempts, output.M_CONFIG: config,
    }
    manifest[output.M_EXIT_CODE] = exit_code(manifest)
    return manifest


def summary_text(manifest: dict, min_prob: float, breeds: int = 5) -> str:
    """The closing lines an operator reads (`breeds` most frequent breeds; the manifest has all).
    "Already done" counts inputs, as the manifest's `skipped` does: an archive skipped whole is one."""
    m = manifest
    head = (f"run {m[output.M_RUN_ID]}: {m[output.M_IMAGES]} images "
            f"({m[output.M_LABELLED]} labelled, {m[output.M_ERRORS]} errors, {m[output.M_SKIPPED]} inputs already done"
            + (f", {m[output.M_RESUMED]} from the interrupted attempt" if m.get(output.M_RESUMED) else "") + ")")
    unreadable = m.get(output.M_STILL_UNREADABLE) or {}
    retry = ("  still unreadable, as in an earlier run (no second row; fix it and rerun): "
             + ", ".join(f"{k}: {v}" for k, v in unreadable.items())) if unreadable else None
    if not m[output.M_IMAGES] and not m.get(output.M_RESUMED):
        return f"{head}: nothing new to label; {m[output.M_WALL_S]:.1f} s" + (f"\n{retry}" if retry else "")
    lines = [head, f"  {m[output.M_IMG_PER_S]:.1f} img/s, wall {m[output.M_WALL_S]:.1f} s"
             + (f" (first rows after {m[output.M_STARTUP_S]:.1f} s)" if m.get(output.M_STARTUP_S) is not None else "")
             + f", runtime {m[output.M_RUNTIME]}, model {m[output.M_MODEL_ID][:12]}"]
    if m[output.M_ERRORS_BY_KIND]:
        kinds = ", ".join(f"{k}: {v}" for k, v in m[output.M_ERRORS_BY_KIND].items())
        lines.append(f"  errors by kind: {kinds} (error rate {m[output.M_ERROR_RATE]:.2%})")
    if retry:
        lines.append(retry)
    shown = list(m.get(output.M_BREEDS, {}).items())[:breeds]
    if shown:
        more = len(m[output.M_BREEDS]) - len(shown)
        lines.append("  top breeds: " + ", ".join(f"{k} {v}" for k, v in shown)
                     + (f" (and {more} more in the manifest)" if more > 0 else ""))
    lines.append(f"  low confidence (top-1 prob < {min_prob}): {m[output.M_LOW_CONFIDENCE]}")
    if m.get(output.M_NOT_DOGS) is not None:
        lines.append(f"  no dog found (is_dog false): {m[output.M_NOT_DOGS]}")
    if m[output.M_EXIT_CODE] == EXIT_ERROR_BUDGET:
        lines.append(f"  error rate {m[output.M_ERROR_RATE]:.2%} exceeds --max-error-rate "
                     f"{m[output.M_MAX_ERROR_RATE]}: exit code {EXIT_ERROR_BUDGET} (all rows were written)")
    return "\n".join(lines)
