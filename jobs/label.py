"""Label folders, S3 prefixes, tar/zip archives and manifests into Parquet with a Ray Data job.

    breedlabel label s3://bucket/photos/ archive.tar.gz --model BUNDLE --out s3://bucket/labels/

One row per input object (bad images get an `error`, never a lost row); Hive-style
`run_id=…/` partitions published only when the run finishes, the run manifest written last.
Exit codes: 0 done, 3 done but the error rate exceeded --max-error-rate, 1 failed, 2 usage.
A crashed run rerun with the same inputs and model resumes from its staged parts;
`--incremental` also skips inputs a finished run already labelled with this model.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from dataclasses import dataclass
from typing import Iterator

from core.errors import ConfigError

log = logging.getLogger(__name__)

PIPELINES = ("auto", "fused", "two-stage")
RUNTIMES = ("auto", "openvino", "tensorflow")


@dataclass(frozen=True)
class LabelConfig:
    """Every default of `breedlabel label` (shown by --help). 0 = sized from the cluster."""

    inputs: tuple[str, ...] = ()
    model: str = ""
    out: str = ""
    manifests: tuple[str, ...] = ()
    any_extension: bool = False       # also label keys without an image extension
    runtime: str = "auto"             # auto = OpenVINO on CPU actors, TensorFlow on GPU actors
    pipeline: str = "auto"            # auto = decode fused into CPU actors, two stages with GPUs
    batch_size: int = 64              # images per inference call
    actors: int = 0                   # 0: one per node (CPU) or one per GPU
    cpus_per_actor: int = 0           # 0: all CPUs of the smallest node (CPU actors)
    decode_threads: int = 0           # 0: the actor's CPUs
    io_threads: int = 8               # concurrent reads per actor (S3 latency)
    rows_per_file: int = 20_000       # target rows per Parquet part
    top_k: int = 3
    min_prob: float = 0.5             # below: counted as low confidence in the summary
    max_error_rate: float = 1.0       # above: exit code 3 (rows are still written)
    incremental: bool = False
    resume: bool = True
    dry_run: bool = False
    address: str | None = None        # Ray address ("auto" = running cluster); none = local Ray
    queue_chunks: int = 8             # listing chunks buffered ahead of the pipeline
    progress: bool = True

    def check(self) -> None:
        """Usage errors (exit 2) before anything starts."""
        if not self.inputs and not self.manifests:
            raise ConfigError("give at least one INPUT (folder, s3:// prefix, archive, image) or --manifest FILE")
        if not self.model:
            raise ConfigError("--model BUNDLE is required (a bundle directory or URI)")
        if not self.out and not self.dry_run:
            raise ConfigError("--out OUTPUT is required (a folder or s3:// prefix for the Parquet)")
        for name in ("batch_size", "rows_per_file", "top_k", "io_threads", "queue_chunks"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("actors", "cpus_per_actor", "decode_threads"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be 0 (auto) or more, got {getattr(self, name)}")
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise ConfigError(f"--max-error-rate must be between 0 and 1, got {self.max_error_rate}")
        if self.runtime not in RUNTIMES:
            raise ConfigError(f"--runtime {self.runtime!r} is not one of {list(RUNTIMES)}")
        if self.pipeline not in PIPELINES:
            raise ConfigError(f"--pipeline {self.pipeline!r} is not one of {list(PIPELINES)}")


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
    parser.add_argument("--rows-per-file", type=int, default=d.rows_per_file, help="target rows per Parquet part")
    parser.add_argument("--top-k", type=int, default=d.top_k, help="breeds kept per image")
    parser.add_argument("--min-prob", type=float, default=d.min_prob,
                        help="top-1 probability below which an image counts as low confidence")
    parser.add_argument("--max-error-rate", type=float, default=d.max_error_rate,
                        help="exit code 3 when the share of rows with an error exceeds this")
    parser.add_argument("--incremental", action="store_true",
                        help="skip inputs a finished run already labelled (same uri, member, bytes, model)")
    parser.add_argument("--no-resume", dest="resume", action="store_false",
                        help="do not resume an interrupted run with the same inputs and model")
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
    from jobs.label_run import label

    cfg = config_from_args(args)
    manifest = label(cfg)
    if cfg.dry_run:
        return 0
    from core.label_summary import exit_code

    return exit_code(manifest)


@dataclass(frozen=True)
class WorkItem:
    """One input object for the pipeline; `data` is set for archive members (read in one pass)."""

    uri: str
    member: str | None = None
    data: bytes | None = None
    error: str | None = None


def iter_items(cfg: LabelConfig) -> Iterator[WorkItem]:
    """The streamed listing of every input (core.sources), archive members with their bytes.

    Why bytes here: a tar can only be read front to back, so each archive (given as an input
    or found in a listed folder) stays one listing item and is read by one sequential pass
    (`iter_archive_members`) that hands its members' bytes on, instead of every actor
    re-reading it. Members a manifest names one by one are read alone by the actors.
    """
    from itertools import chain

    from core import sources, storage

    exts = None if cfg.any_extension else storage.IMAGE_EXTENSIONS
    listings = [sources.iter_items(cfg.inputs, extensions=exts, expand_archives=False)] if cfg.inputs else []
    listings += [sources.iter_items([], manifest=m, extensions=exts, expand_archives=False) for m in cfg.manifests]
    for item in chain.from_iterable(listings):
        if item.is_archive:
            yield from _archive_work(item.uri, exts)
        else:
            yield WorkItem(item.uri, item.member, None, item.error)


def _archive_work(uri: str, exts) -> Iterator[WorkItem]:
    from core import sources

    for got in sources.iter_archive_members(uri, extensions=exts):
        yield WorkItem(got.item.uri, got.item.member, got.data, got.error)


def main(argv: list[str] | None = None) -> int:
    """`python -m jobs.label …`: this subcommand alone (as a Ray job entrypoint), same exit codes."""
    from jobs.cli import main as cli_main

    return cli_main(["label", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
