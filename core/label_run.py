"""One labelling run on its output, from start to commit: resume, skip-set, staging, manifest.

The label job (jobs.label) holds the output's lease (core.lease) around all of this, so no
other run writes the output meanwhile, and drives it:

    run = LabelRun.start(out, cfg, model_id, lease)   # recover, resume or begin, read back
    run.add(rows) ...                                 # rows from the pipeline, staged as they come
    run.commit(plan)                                  # publish + manifest (core.output)

What makes the output a table users can query blindly (one row per uri, member,
content_sha256, model_id across finished runs):
- a run never labels a key a finished run holds (core.skipset), unless `relabel` says so: the
  listing skips objects and whole archives whose listed version a finished run labelled,
  without reading them; the actors skip what they read and find labelled by content;
- a run killed at any point leaves only staged parts; the next run with the same inputs and
  model resumes them (after dropping any key a run finished since then), one that was killed
  after deciding to commit is published by the next run first (`Output.recover`);
- rows are staged as they arrive (every `stage_every_s`), so a kill loses seconds, not the run.
"""
from __future__ import annotations

import collections
import contextlib
import logging
from dataclasses import asdict
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from core import output, schema, storage
from core.errors import StorageError
from core.label_config import LabelConfig
from core.label_plan import PipelinePlan
from core.label_summary import RunStats, build_manifest
from core.labelling import FALLBACK_META, RUNTIME_META, SECONDS_META, SKIPPED
from core.lease import Lease, LeaseLostError
from core.reasons import is_retried, reason_of
from core.skipset import KeyLog, SkipSet, archive_key, contains_all, listing_key, too_large_version
from core.sources import InputItem, manifest_identity, manifest_uri

log = logging.getLogger(__name__)

RUN_INPUTS = "inputs"
RUN_MANIFESTS = "manifests"
RUN_ANY_EXTENSION = "any_extension"
RUN_RELABEL = "relabel"
RUN_ATTEMPT = "attempt"
RUN_DOG_THRESHOLD = "dog_threshold"
_ADDED_LATER = (RUN_DOG_THRESHOLD,)  # a staged run from before these were recorded matches any value


def run_identity(cfg: LabelConfig, model_id: str) -> dict:
    """What a rerun must match to resume a run: the same inputs, model and options that choose rows
    or what the rows say (`is_dog` is flagged at the threshold: a resumed run must not mix two)."""
    return {output.M_MODEL_ID: model_id, RUN_INPUTS: [storage.normalize_uri(u) for u in cfg.inputs],
            RUN_MANIFESTS: [manifest_identity(u) for u in cfg.manifests],
            RUN_ANY_EXTENSION: cfg.any_extension, RUN_RELABEL: cfg.relabel, RUN_DOG_THRESHOLD: cfg.dog_threshold}


class LabelRun:
    """The state of one run; build it with `LabelRun.start`."""

    def __init__(self, out: output.Output, cfg: LabelConfig, model_id: str, lease: Lease | None,
                 run_id: str, attempt: int, staged: list[str]):
        self.out, self.cfg, self.model_id, self.lease = out, cfg, model_id, lease
        self.run_id, self.attempt, self.staged = run_id, attempt, staged
        self.stats = RunStats(min_prob=cfg.min_prob)
        self.writer = output.PartWriter(out, run_id, attempt, cfg.rows_per_file, cfg.stage_every_s)
        self.runtimes: collections.Counter = collections.Counter()
        self.fallbacks: set[str] = set()
        self.seen = 0      # rows that came back from the pipeline (written + skipped)
        self.resumed_rows = 0
        self.skipset = SkipSet()  # what finished runs (and earlier attempts of this one) hold
        self.keys = KeyLog(cfg.max_object_bytes)  # the keys of this run's rows: its `_keys.npz`
        self.whole_archives: set[str] = set()  # archives listed whole (not members named by a manifest)

    @property
    def done_keys(self) -> np.ndarray | None:
        """Content keys the actors skip after reading (None when empty)."""
        return self.skipset.content if len(self.skipset.content) else None

    # -- start
    @classmethod
    def start(cls, out: output.Output, cfg: LabelConfig, model_id: str, lease: Lease | None) -> "LabelRun":
        """Publish interrupted commits, then resume the newest interrupted run with the same
        identity, or begin a new one; build the skip-set the actors use."""
        for run_id in out.recover():
            log.warning("published run %s, whose commit an earlier run did not finish", run_id)
        finished = SkipSet() if cfg.relabel else out.done_keys(model_id)
        run = cls._resume(out, cfg, model_id, lease, finished) or cls._begin(out, cfg, model_id, lease)
        # staged rows may hold part of an archive: their archives' own keys do not count yet
        run.skipset = SkipSet.union([finished, out.parts_keys(run.staged, archives=False)])
        if lease is not None:
            lease.renew(cfg.lease_ttl_s, run_id=run.run_id)  # the lease names the run it protects
        return run

    @classmethod
    def _begin(cls, out, cfg, model_id, lease) -> "LabelRun":
        run_id = lease.info.run_id if lease is not None else output.new_run_id()  # the id a waiting run is told
        out.write_json(out.staging(run_id, output.RUN_FILE),
                       {output.M_RUN_ID: run_id, RUN_ATTEMPT: 0, **run_identity(cfg, model_id)})
        return cls(out, cfg, model_id, lease, run_id, 0, [])

    @classmethod
    def _resume(cls, out, cfg, model_id, lease, finished: SkipSet) -> "LabelRun | None":
        if not cfg.resume:
            return None
        ident = run_identity(cfg, model_id)
        for run_id in reversed(out.staged_runs()):
            meta = out.read_json(out.staging(run_id, output.RUN_FILE)) or {}
            if {k: meta.get(k, ident[k] if k in _ADDED_LATER else None) for k in ident} != ident:
                continue
            attempt = int(meta.get(RUN_ATTEMPT, 0)) + 1
            out.write_json(out.staging(run_id, output.RUN_FILE), {**meta, RUN_ATTEMPT: attempt})
            run = cls(out, cfg, model_id, lease, run_id, attempt, [])
            run._read_back(out.staged_parts(run_id), finished)
            return run
        return None

    def _read_back(self, parts: list[str], finished: SkipSet) -> None:
        """Count what earlier attempts staged (the manifest covers the whole run), after dropping
        rows whose key a run finished since they were staged."""
        dropped = 0
        for path in parts:
            if len(finished.content):
                dropped += self.out.drop_rows_in(path, finished.content)
            if not self.out.exists(path):
                continue
            table = pq.read_table(path, filesystem=self.out.fs)
            self.stats.add(table, resumed=True)
            self.keys.add_rows(table)
            self.resumed_rows += table.num_rows
            self.staged.append(path)
        if dropped:  # once, not once per part
            log.info("run %s: dropped %d staged rows that a later finished run already holds", self.run_id, dropped)
        if self.resumed_rows:
            log.info("resuming run %s (attempt %d): %d images already labelled by the interrupted attempt(s)",
                     self.run_id, self.attempt + 1, self.resumed_rows)

    # -- listing
    def keep(self, items: Sequence[InputItem]) -> np.ndarray:
        """False for each listed object (or whole archive) whose listed version a finished run
        holds: it is skipped without being read. Objects listed without a version are read."""
        mask = np.ones(len(items), dtype=bool)
        self.whole_archives.update(item.uri for item in items if item.is_archive)
        known = [i for i, item in enumerate(items) if item.version is not None]
        if not known or not len(self.skipset.listing):
            return mask
        keys = np.fromiter((self._listing_key(items[i], items[i].version) for i in known), np.uint64,
                           count=len(known))
        done = contains_all(self.skipset.listing, keys)
        # as a `too large` row at this limit: only what can be one (an archive: one of its members)
        limit = self.cfg.max_object_bytes
        maybe = [j for j, i in enumerate(known) if items[i].is_archive or items[i].size is None
                 or items[i].size > limit]
        if maybe:
            too_large = np.fromiter((self._listing_key(items[known[j]], too_large_version(items[known[j]].version,
                                                                                          limit)) for j in maybe),
                                    np.uint64, count=len(maybe))
            done[maybe] |= contains_all(self.skipset.listing, too_large)
        mask[np.asarray(known)[done]] = False
        self.stats.skipped += int(done.sum())
        return mask

    def _listing_key(self, item: InputItem, version: str) -> int:
        """Its key as labelled; with `too_large_version`, as a row found too large at this run's
        --max-object-mb (a larger limit reads it again)."""
        if item.is_archive:
            return archive_key(item.uri, version, self.model_id)
        return listing_key(item.uri, item.member, version, self.model_id)

    # -- rows
    def add(self, rows: pa.Table) -> pa.Table:
        """Rows from the pipeline (with the SKIPPED column): stage the new ones; returns them."""
        meta = rows.schema.metadata or {}
        skip = rows.column(SKIPPED)
        fresh = rows.filter(pc.invert(skip)).drop_columns([SKIPPED])
        self._check_lease()
        self.writer.add(fresh)
        skipped = rows.filter(skip)
        failed = skipped.filter(pc.is_valid(skipped.column(schema.ERROR))).column(schema.ERROR).to_pylist()
        retried = [reason_of(error) for error in failed if is_retried(error)]
        self.stats.still_unreadable.update(retried)
        self.stats.add(fresh, skipped.num_rows - len(retried))
        self.keys.add_rows(fresh)
        if skipped.num_rows:  # read again (changed version, same content): next time skip unread
            self.keys.add_rows(skipped, content=False)
        self.seen += rows.num_rows
        self.stats.busy_s += float(meta.get(SECONDS_META, b"0"))
        labelled = int(pc.sum(pc.is_null(fresh.column(schema.ERROR))).as_py() or 0)
        if RUNTIME_META in meta and labelled:
            self.runtimes[meta[RUNTIME_META].decode()] += labelled
        reason = meta.get(FALLBACK_META)
        if reason and reason.decode() not in self.fallbacks:
            self.fallbacks.add(reason.decode())
            log.warning("a predict actor runs TensorFlow instead of OpenVINO: %s", reason.decode())
        return fresh

    def stage(self) -> None:
        """Stage every row received so far (on a stop or a failure: the next run resumes them),
        unless the lease was lost: the run that took it over labels these inputs itself."""
        try:
            self._check_lease()
        except LeaseLostError:
            log.warning("run %s: %d received rows not staged: the lease was taken over", self.run_id,
                        self.writer.buffered)
            return
        self.writer.flush()

    @property
    def _lease_lost(self) -> bool:
        return self.lease is not None and self.lease.lost

    def _check_lease(self) -> None:
        """A stalled run whose lease expired and was taken over must not stage another part: one
        that finds its lease out of date renews it first (`Lease.confirm`)."""
        if self.lease is not None and not self.lease.lost:
            # lost: said below, in this run's words; S3 not answering: as the renewal thread, go on
            with contextlib.suppress(LeaseLostError, StorageError):
                self.lease.confirm(self.cfg.lease_ttl_s)
        if self._lease_lost:
            raise LeaseLostError(f"{self.lease.uri}: the lease of run {self.run_id} was taken over by another "
                                 "run after it expired; that run labels the rest, this one stops without staging")

    # -- commit
    def commit(self, plan: PipelinePlan | None) -> dict:
        """Stage the rest, check the lease is still ours, publish; returns the run manifest."""
        self._check_lease()
        self.writer.flush()
        if self.lease is not None:
            self.lease.renew(self.cfg.lease_ttl_s)  # LeaseLostError: someone else may write; publish nothing
        startup = None if self.stats.first_row_at is None else self.stats.first_row_at - self.stats.started
        manifest = build_manifest(
            self.stats, run_id=self.run_id, model_id=self.model_id, runtime=self._runtime(plan),
            inputs=[*map(storage.normalize_uri, self.cfg.inputs), *map(manifest_uri, self.cfg.manifests)],
            max_error_rate=self.cfg.max_error_rate, attempts=self.attempt + 1, resumed_rows=self.resumed_rows,
            config={**asdict(self.cfg), "plan": plan.to_dict() if plan else None},
            startup_s=startup)
        manifest[output.M_RUNTIMES] = dict(self.runtimes)
        # staged rows of an earlier attempt are listed and skipped again: not "already labelled" by another run
        manifest[output.M_SKIPPED] = max(0, self.stats.skipped - self.resumed_rows)
        return self.out.commit(self.run_id, manifest, self.keys.skipset(self.whole_archives),
                               parts=[*self.staged, *self.writer.files])

    def abandon(self) -> None:
        """A new run that failed before staging anything leaves no trace (no `_run.json` debris)."""
        if self.attempt == 0 and not self.out.staged_parts(self.run_id):
            self.out.discard_staged(self.run_id)

    def _runtime(self, plan: PipelinePlan | None) -> str | None:
        """The runtime that labelled the rows: one name, or "mixed" (the manifest's `runtimes` says which)."""
        names = {label.split("/")[0] for label in self.runtimes}
        if len(names) == 1:
            return names.pop()
        if names:
            return "mixed"
        return plan.runtime if plan else None
