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

from core import console, labelling, lease, output, storage
from core.bundle import load_bundle
from core.errors import ConfigError, ServiceError
from core.label_config import PIPELINES, LabelConfig
from core.label_run import LabelRun
from core.label_summary import exit_code, summary_text
from core.runtime import RUNTIMES
from core.sources import ItemData, iter_label_items
from core.stop import GracefulStop, Stopped
from core.storage import IMAGE_EXTENSIONS
from jobs import ray_session
from jobs.cli import main as cli_main
from jobs.label_pipeline import run_pipeline

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = LabelConfig()
    parser.add_argument("inputs", nargs="*", metavar="INPUT",
                        help="folders, file:// or s3:// prefixes, images, .tar/.tar.gz/.tgz/.zip archives")
    parser.add_argument("--model", required=True, metavar="BUNDLE", help="bundle directory or URI")
    parser.add_argument("--out", default=d.out, metavar="OUTPUT", help="output folder or s3:// prefix")
    parser.add_argument("--manifest", dest="manifests", action="append", default=[], metavar="FILE",
                        help="a list of URIs (txt, or a csv/parquet column); repeatable")
    parser.add_argument("--any-extension", action="store_true", help="also label keys without an image extension")
    parser.add_argument("--runtime", choices=RUNTIMES, default=d.runtime,
                        help="auto = OpenVINO on CPU actors, TensorFlow on GPU actors")
    parser.add_argument("--pipeline", choices=PIPELINES, default=d.pipeline,
                        help="fused = decode threads inside the predict actor; two-stage = decode tasks "
                             "then predict actors; auto = fused on CPU, two-stage with GPUs")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="images per inference call")
    parser.add_argument("--actors", type=int, default=d.actors, help="predict actors (0 = auto)")
    parser.add_argument("--cpus-per-actor", type=int, default=d.cpus_per_actor,
                        help="CPUs each CPU actor holds (0 = all CPUs of a node)")
    parser.add_argument("--decode-threads", type=int, default=d.decode_threads,
                        help="decode threads per actor (0 = the actor's CPUs)")
    parser.add_argument("--io-threads", type=int, default=d.io_threads, help="concurrent reads per actor")
    parser.add_argument("--io-timeout", dest="io_timeout_s", type=float, default=d.io_timeout_s, metavar="S",
                        help="seconds an S3 request may take; after --io-attempts tries the run fails (exit 1, "
                             "resumable): a dead or frozen endpoint is never a row error")
    parser.add_argument("--io-attempts", type=int, default=d.io_attempts, help="tries per S3 request, with backoff")
    parser.add_argument("--max-object-mb", type=float, default=d.max_object_mb, metavar="MB",
                        help="larger objects and archive members get an error row (too large) and are never read")
    parser.add_argument("--chunk-mb", type=float, default=d.chunk_mb, metavar="MB",
                        help="archive-member bytes per unit of work: bounds the bytes in flight")
    parser.add_argument("--follow-symlinks", action="store_true",
                        help="also list symlinked directories (each directory once); files behind symlinks "
                             "are always listed")
    parser.add_argument("--rows-per-file", type=int, default=d.rows_per_file, help="target rows per Parquet part")
    parser.add_argument("--stage-every", dest="stage_every_s", type=float, default=d.stage_every_s, metavar="S",
                        help="stage the rows received at least every S seconds: the most a kill can lose")
    parser.add_argument("--top-k", type=int, default=d.top_k, help="breeds kept per image")
    parser.add_argument("--min-prob", type=float, default=d.min_prob,
                        help="top-1 probability below which an image counts as low confidence")
    parser.add_argument("--summary-breeds", type=int, default=d.summary_breeds, metavar="N",
                        help="breeds listed in the closing summary (the manifest keeps them all)")
    parser.add_argument("--max-error-rate", type=float, default=d.max_error_rate,
                        help="exit code 3 when the share of rows with an error exceeds this")
    parser.add_argument("--relabel", action="store_true",
                        help="label again inputs a finished run already labelled with this model (readers then "
                             "see one row per run for them; by default they are skipped)")
    parser.add_argument("--incremental", action="store_true",
                        help="skip inputs a finished run already labelled (same uri, member, content hash, "
                             "model): always on unless --relabel; kept for older scripts")
    parser.add_argument("--no-resume", dest="resume", action="store_false",
                        help="start a new run instead of resuming an interrupted one with the same inputs and model")
    parser.add_argument("--lease-ttl", dest="lease_ttl_s", type=float, default=d.lease_ttl_s, metavar="S",
                        help="the output's lease lifetime, renewed every S/3 while the run works")
    parser.add_argument("--dry-run", action="store_true", help="list what would be labelled, label nothing")
    parser.add_argument("--address", default=d.address, help="Ray cluster address ('auto'); default: local Ray")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> LabelConfig:
    fields = {f.name for f in dataclasses.fields(LabelConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    values["inputs"] = tuple(values.get("inputs") or ())
    values["manifests"] = tuple(values.get("manifests") or ())
    return LabelConfig(**values)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    manifest = label(cfg)
    return 0 if cfg.dry_run else exit_code(manifest)


def label(cfg: LabelConfig) -> dict | None:
    """Run the job; returns the run manifest (None for --dry-run). Raises BreedlabelError on failure:
    LeaseHeldError (75) when another run writes the output, Stopped (1) on SIGTERM/SIGINT."""
    cfg.check()
    cfg = _absolute(cfg)
    bundle = load_bundle(cfg.model)
    if cfg.top_k > bundle.num_classes:
        raise ConfigError(f"--top-k {cfg.top_k}: the bundle {cfg.model} has {bundle.num_classes} classes; "
                          f"give at most {bundle.num_classes}")
    if cfg.dry_run:
        dry_run(cfg, bundle.model_id)
        return None
    out = output.Output(cfg.out, s3=cfg.s3)
    started_ray = plan = None
    with GracefulStop() as stop, lease.held(out.uri, output.new_run_id(), ttl_s=cfg.lease_ttl_s, s3=cfg.s3,
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
                    started_ray = ray_session.connect(cfg.address, dashboard=False, quiet=True)
                    stop.arm()  # ray.init installs a SIGTERM handler of its own (sys.exit anywhere)
                    plan = run_pipeline(cfg, run, chain([first], items), stop)
        except BaseException as exc:
            with stop.deferred():
                run.stage()  # what arrived is staged: a rerun resumes from it
                run.abandon()
            if isinstance(exc, Stopped):
                raise Stopped(f"{exc}: {run.stats.images} images of run {run.run_id} are staged; rerun the "
                              "same command to resume") from None
            if isinstance(exc, ServiceError) and run.stats.images:
                raise ServiceError(f"{exc} ({run.stats.images} images of run {run.run_id} are staged; nothing "
                                   "was published)") from None
            raise  # the lease is released on the way out; Ray is shut down at exit (after the message)
        with stop.deferred():
            manifest = run.commit(plan)
    if started_ray:
        import ray

        ray.shutdown()
    print(summary_text(manifest, cfg.min_prob, cfg.summary_breeds), file=sys.stderr)
    return manifest


def _absolute(cfg: LabelConfig) -> LabelConfig:
    """Local paths as absolute paths: the manifest records what a run read and wrote wherever it
    was started from, and actors on other nodes or in other directories find the same files."""
    norm = storage.normalize_uri
    return dataclasses.replace(cfg, inputs=tuple(map(norm, cfg.inputs)), manifests=tuple(map(norm, cfg.manifests)),
                               model=norm(cfg.model), out=norm(cfg.out) if cfg.out else cfg.out)


def _pending(cfg: LabelConfig, run: LabelRun | None) -> Iterator[ItemData]:
    """The listing, without what a finished run labelled (judged from the listing alone)."""
    return iter_label_items(cfg.inputs, cfg.manifests, extensions=None if cfg.any_extension else IMAGE_EXTENSIONS,
                            keep=run.keep if run else None, s3=cfg.s3, follow_symlinks=cfg.follow_symlinks,
                            max_object_bytes=cfg.max_object_bytes)


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
            done = run.done if run else None
            shas = (labelling.fetch(uris, members, [i.data for i in chunk], [i.error for i in chunk], pool, read).shas
                    if done is not None else [""] * len(chunk))
            skip = labelling.skip_mask(uris, members, shas, model_id, done)
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
