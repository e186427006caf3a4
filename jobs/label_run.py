"""One `breedlabel label` run from start to manifest: resume, skip-set, pipeline, writer, commit.

The order is what makes a run safe to kill at any moment: parts are staged under `_staging/`
while the pipeline works; only after every listed input has a row is the run committed
(parts published, manifest written last). A rerun with the same inputs and model finds the
staged parts and labels only what they lack.
"""
from __future__ import annotations

import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from core import labelling, output, schema, storage
from core.bundle import load_bundle
from core.errors import JobError
from core.label_summary import RunStats, build_manifest, summary_text
from jobs import ray_session
from jobs.label import LabelConfig, iter_items

log = logging.getLogger(__name__)

RUN_INPUTS = "inputs"
RUN_MANIFESTS = "manifests"
RUN_ANY_EXTENSION = "any_extension"
RUN_ATTEMPT = "attempt"


@dataclass
class RunState:
    run_id: str
    attempt: int
    staged: list[str]  # parts staged by earlier attempts (resume)


def _identity(cfg: LabelConfig, model_id: str) -> dict:
    return {output.M_MODEL_ID: model_id, RUN_INPUTS: [storage.normalize_uri(u) for u in cfg.inputs],
            RUN_MANIFESTS: [storage.normalize_uri(u) for u in cfg.manifests], RUN_ANY_EXTENSION: cfg.any_extension}


def start_run(out: output.Output, cfg: LabelConfig, model_id: str) -> RunState:
    """Resume the newest interrupted run with the same inputs and model, or start a new one."""
    ident = _identity(cfg, model_id)
    if cfg.resume:
        for run_id in reversed(out.staged_runs()):
            meta = out.read_json(out.staging(run_id, output.RUN_FILE)) or {}
            if {k: meta.get(k) for k in ident} == ident:
                attempt = int(meta.get(RUN_ATTEMPT, 0)) + 1
                out.write_json(out.staging(run_id, output.RUN_FILE), {**meta, RUN_ATTEMPT: attempt})
                return RunState(run_id, attempt, out.staged_parts(run_id))
    run_id = output.new_run_id()
    out.write_json(out.staging(run_id, output.RUN_FILE), {output.M_RUN_ID: run_id, RUN_ATTEMPT: 0, **ident})
    return RunState(run_id, 0, [])


def label(cfg: LabelConfig) -> dict | None:
    """Run the job; returns the run manifest (None for --dry-run). Raises BreedlabelError on failure."""
    cfg.check()
    bundle = load_bundle(cfg.model)
    if cfg.dry_run:
        dry_run(cfg, bundle.model_id)
        return None
    out = output.Output(cfg.out)
    for run_id in out.recover():
        log.info("published run %s, whose commit an earlier crash interrupted", run_id)
    state = start_run(out, cfg, bundle.model_id)
    stats = RunStats(min_prob=cfg.min_prob)
    resumed = _read_back(out, state, stats)
    done = None
    if cfg.incremental:
        done = out.done_keys(bundle.model_id, state.staged)
    elif state.staged:
        done = output.key_set(out.iter_keys(state.staged, bundle.model_id))
    started_ray = ray_session.connect(cfg.address, dashboard=False, quiet=True)
    try:
        shape, writer, skipped = _execute(cfg, out, state, stats, done)
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    manifest = build_manifest(
        stats, run_id=state.run_id, model_id=bundle.model_id, runtime=shape["runtime"],
        inputs=[*cfg.inputs, *cfg.manifests], max_error_rate=cfg.max_error_rate, attempts=state.attempt + 1,
        resumed_rows=resumed, config={**asdict(cfg), "plan": shape})
    manifest[output.M_SKIPPED] = max(0, skipped - resumed)
    out.commit(state.run_id, manifest)
    print(summary_text(manifest, cfg.min_prob), file=sys.stderr)
    return out.read_json(out.published(state.run_id, output.MANIFEST_FILE))


def _read_back(out: output.Output, state: RunState, stats: RunStats) -> int:
    """Count the rows an interrupted attempt staged, so the manifest covers the whole run."""
    rows = 0
    for path in state.staged:
        table = pq.read_table(path, filesystem=out.fs, columns=[schema.ERROR, schema.BREED, schema.PROB])
        stats.add(table)
        rows += table.num_rows
    if rows:
        log.info("resuming run %s: %d images already labelled by attempt %d", state.run_id, rows, state.attempt - 1)
    return rows


def _execute(cfg: LabelConfig, out: output.Output, state: RunState, stats: RunStats, done):
    import ray

    from jobs.label_pipeline import Feeder, build_dataset, plan

    shape = plan(cfg)
    shape["runtime"] = cfg.runtime if cfg.runtime != "auto" else (
        "tensorflow" if shape["gpus_per_actor"] else "openvino")
    log.info("label plan: %s", shape)
    done_ref = ray.put(done) if done is not None and len(done) else None
    feeder = Feeder(iter_items(cfg), cfg.batch_size, cfg.queue_chunks).start()
    writer = output.PartWriter(out, state.run_id, state.attempt, cfg.rows_per_file)
    pbar = _progress(cfg)
    seen = skipped = 0
    try:
        ds = build_dataset(cfg, shape, feeder.queue, state.run_id, done_ref)
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            skip = batch.column(labelling.SKIPPED)
            rows = schema.conform(batch.filter(pc.invert(skip)))
            writer.add(rows)
            stats.add(rows, batch.num_rows - rows.num_rows)
            seen += batch.num_rows
            skipped += batch.num_rows - rows.num_rows
            _tick(pbar, feeder, batch.num_rows, stats)
    finally:
        feeder.stop()
        if pbar is not None:
            pbar.close()
    if feeder.error is not None:
        raise feeder.error
    if not feeder.finished or seen != feeder.listed:
        raise JobError(f"run {state.run_id}: {feeder.listed} inputs listed but {seen} came back from the "
                       "pipeline; nothing was published. Rerun the same command: it resumes from the staged parts")
    writer.flush()
    return shape, writer, skipped


def _progress(cfg: LabelConfig):
    if not cfg.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=0, unit="img", desc="labelling", dynamic_ncols=True, smoothing=0.05, file=sys.stderr)


def _tick(pbar, feeder, n: int, stats: RunStats) -> None:
    if pbar is None:
        return
    pbar.total = max(feeder.listed, pbar.n + n)
    pbar.set_postfix_str(f"errors {stats.errors}" + ("" if feeder.finished else ", listing…"), refresh=False)
    pbar.update(n)


def dry_run(cfg: LabelConfig, model_id: str) -> None:
    """Print what would be labelled (one line each) and how many inputs are already done."""
    done = np.zeros(0, np.uint64)
    if cfg.out and cfg.incremental:
        done = output.Output(cfg.out).done_keys(model_id)
    total = already = 0
    with ThreadPoolExecutor(cfg.io_threads) as pool:
        for chunk in _chunks(iter_items(cfg), 256):
            table = {labelling.COL_URI: [i.uri for i in chunk], labelling.COL_MEMBER: [i.member for i in chunk],
                     labelling.COL_DATA: [getattr(i, "data", None) for i in chunk],
                     labelling.COL_ERROR: [getattr(i, "error", None) for i in chunk]}
            shas = labelling.fetch(table, pool).shas if len(done) else [""] * len(chunk)
            skip = labelling.skip_mask(table[labelling.COL_URI], table[labelling.COL_MEMBER], shas, model_id, done)
            for item, s in zip(chunk, skip):
                if not s:
                    print(item.uri if item.member is None else f"{item.uri}\t{item.member}")
            total += len(chunk)
            already += int(skip.sum())
    print(f"dry run: {total} inputs, {already} already labelled with model {model_id[:12]}, "
          f"{total - already} would be labelled", file=sys.stderr)


def _chunks(items, n: int):
    buf = []
    for item in items:
        buf.append(item)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf
