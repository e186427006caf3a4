"""Label folders, S3 prefixes, tar/zip archives and manifests into Parquet with a Ray Data job.

    breedlabel label s3://bucket/photos/ archive.tar.gz --model BUNDLE --out s3://bucket/labels/

One row per input object and model (bad images get an `error`, never a lost row), whatever
runs overlap, get killed or are repeated: every run holds the output's lease, skips what a
finished run already labelled with the same model, stages its rows as they come and
publishes them together with the run manifest. Exit codes: 0 done, 3 done but the error rate
exceeded --max-error-rate, 75 skipped (another run holds the output), 1 failed or stopped
(rerun the same command: it resumes), 2 usage.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from itertools import chain, islice
from typing import Iterator

from core import console, labelling, lease, options, output, storage
from core.bundle import load_bundle
from core.errors import ConfigError, ServiceError
from core.label_config import LabelConfig
from core.label_run import LabelRun
from core.label_summary import exit_code, summary_text
from core.sources import ItemData, iter_label_items, manifest_identity, manifest_uri
from core.stop import GracefulStop, Stopped
from core.formats import LABEL_EXTENSIONS
from jobs import ray_session
from jobs.cli import main as cli_main
from jobs.label_pipeline import run_pipeline

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_options(parser, LabelConfig)
    parser.add_argument("--incremental", action="store_true",
                        help="kept for older scripts: skipping what a finished run labelled is always on "
                             "(--relabel turns it off)")


def run(args: argparse.Namespace) -> int:
    cfg = LabelConfig(**options.values(args, LabelConfig))
    manifest = label(cfg)
    return 0 if cfg.dry_run else exit_code(manifest)


def label(cfg: LabelConfig) -> dict | None:
    """Run the job; returns the run manifest (None for --dry-run). Raises BreedlabelError on failure:
    LeaseHeldError (75) when another run writes the output, Stopped (1) on SIGTERM/SIGINT."""
    cfg.check()
    ray_session.check_address(cfg.address, ray_data="the label job")
    cfg = _absolute(cfg)
    bundle = load_bundle(cfg.model)
    if cfg.top_k > bundle.num_classes:
        raise ConfigError(f"--top-k {cfg.top_k}: the bundle {cfg.model} has {bundle.num_classes} classes; "
                          f"give at most {bundle.num_classes}")
    if cfg.dog_threshold is not None and bundle.dog_threshold is None:
        raise ConfigError(f"--dog-threshold: the bundle {cfg.model} has no dog score (exported before it existed, "
                          "or trained with --no-dog-score); drop the option or label with a newer bundle")
    if cfg.dog_threshold is None and bundle.dog_threshold is not None:
        # the manifest's config records the threshold the rows are flagged with, which review reads
        cfg = dataclasses.replace(cfg, dog_threshold=bundle.dog_threshold)
    for manifest in cfg.manifests:  # standard input or a pipe is read now, once: a terminal fails before the lease
        manifest_identity(manifest)
    if cfg.dry_run:
        dry_run(cfg, bundle.model_id)
        return None
    out = output.Output(cfg.out, s3=cfg.s3)
    out.check_is_ours()
    started_ray = plan = None
    with GracefulStop() as stop:
        with lease.held(out.uri, output.new_run_id(), ttl_s=cfg.lease_ttl_s, s3=cfg.s3,
                        on_lost=lambda exc: stop.request(str(exc))) as held:
            run = LabelRun.start(out, cfg, bundle.model_id, held)
            try:
                # List until the first object still to label before starting Ray: a bad input fails in
                # a second, and a scheduled run over an unchanged bucket ends without Ray at all.
                items = _pending(cfg, run)
                first = next(items, None)
                if first is not None:
                    # Ray's C++ lines ("E … core_worker.cc") go to a log file; our progress and messages stay
                    with console.native_output_to_log(f"label-{run.run_id}.log"):
                        started_ray = ray_session.connect(cfg.address, dashboard=False, quiet=True, stop=stop)
                        plan = run_pipeline(cfg, run, chain([first], items), stop)
            except BaseException as exc:
                with stop.deferred():
                    run.stage()  # what arrived is staged: a rerun resumes from it
                    run.abandon()
                if held.lost:  # stalled past its lease: the run that took over labels these inputs
                    raise lease.LeaseLostError(f"{held.uri}: run {run.run_id} stalled past its lease and another "
                                               "run took it over; that run finishes the labelling, nothing more "
                                               "was staged here") from None
                if isinstance(exc, Stopped):
                    raise Stopped(f"{exc}: {run.stats.images} images of run {run.run_id} are staged; rerun the "
                                  "same command to resume") from None
                if isinstance(exc, ServiceError) and run.stats.images:
                    raise ServiceError(f"{exc} ({run.stats.images} images of run {run.run_id} are staged; "
                                       "nothing was published)") from None
                raise  # the lease is released on the way out; Ray is shut down after the message (jobs.cli)
            with stop.deferred():
                manifest = run.commit(plan)
            stop.finish()  # published: a signal from now on (lease release, Ray's shutdown) is only noted
        if started_ray:
            ray_session.shutdown_uninterruptible()
        print(summary_text(manifest, cfg.min_prob, cfg.summary_breeds), file=sys.stderr)
    stop.warn_if_finished_anyway(f"run {manifest[output.M_RUN_ID]} was already published")
    return manifest


def _absolute(cfg: LabelConfig) -> LabelConfig:
    """Local paths as absolute paths: the manifest records what a run read and wrote wherever it
    was started from, and actors on other nodes or in other directories find the same files."""
    norm = storage.normalize_uri
    return dataclasses.replace(cfg, inputs=tuple(map(norm, cfg.inputs)),
                               manifests=tuple(map(manifest_uri, cfg.manifests)), model=norm(cfg.model),
                               out=norm(cfg.out) if cfg.out else cfg.out)


def _pending(cfg: LabelConfig, run: LabelRun | None) -> Iterator[ItemData]:
    """The listing, without what a finished run labelled (judged from the listing alone)."""
    return iter_label_items(cfg.inputs, cfg.manifests, extensions=None if cfg.any_extension else LABEL_EXTENSIONS,
                            keep=run.keep if run else None, s3=cfg.s3, follow_symlinks=cfg.follow_symlinks,
                            max_object_bytes=cfg.max_object_bytes, exclude=cfg.out)


def dry_run(cfg: LabelConfig, model_id: str) -> None:
    """Print what would be labelled (one line each) and how many inputs are already done.

    Objects whose listed version a finished run labelled are skipped unread, as in a real run;
    the others are read and hashed, and skipped when their content was labelled."""
    out = output.Output(cfg.out, s3=cfg.s3) if cfg.out else None
    run = LabelRun(out, cfg, model_id, None, "dry-run", 0, []) if out else None
    if run is not None and not cfg.relabel:
        run.skipset = out.done_keys(model_id)
    items = _pending(cfg, run)
    read = labelling.reader(cfg.s3, cfg.max_object_bytes)
    total = already = 0
    with ThreadPoolExecutor(cfg.io_threads) as pool:
        while chunk := list(islice(items, 256)):
            uris, members = [i.item.uri for i in chunk], [i.item.member for i in chunk]
            done_keys = run.done_keys if run else None
            shas = (labelling.fetch(uris, members, [i.data for i in chunk], [i.error for i in chunk], pool, read).shas
                    if done_keys is not None else [""] * len(chunk))
            skip = labelling.skip_mask(uris, members, shas, model_id, done_keys)
            for uri, member, s in zip(uris, members, skip):
                if not s:  # one line an item, whatever the names hold (a newline is printed as \n)
                    print(_one_line(uri) if member is None else f"{_one_line(uri)}\t{_one_line(member)}")
            total += len(chunk)
            already += int(skip.sum())
    unread = run.stats.skipped if run else 0
    print(f"dry run: {total + unread} inputs, {already + unread} already labelled with model {model_id[:12]} "
          f"({unread} judged from the listing alone), {total - already} would be labelled", file=sys.stderr)


def _one_line(name: str) -> str:
    return name.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def main(argv: list[str] | None = None) -> int:
    """`python -m jobs.label …`: this subcommand alone (as a Ray job entrypoint), same exit codes."""
    return cli_main(["label", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
