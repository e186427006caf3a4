"""Export a review queue of a label output for Label Studio, most uncertain rows first.

    breedlabel review OUT --to review.json [--limit 500] [--labeling-config review.xml]

Reads the finished runs of OUT (never a half-written one) and writes a Label Studio import file
(core.review). Import it into a project whose labeling interface is `--labeling-config`'s.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from core.errors import EXIT_OK, ConfigError, StorageError

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", metavar="OUTPUT", help="a label output folder or s3:// prefix")
    parser.add_argument("--to", required=True, metavar="REVIEW_JSON", help="the Label Studio import file to write")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="at most N tasks (default: every row)")
    parser.add_argument("--local-files-root", default="/", metavar="DIR",
                        help="local photos become Label Studio local-files URLs relative to DIR: start Label Studio "
                             "with LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true and "
                             "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=DIR")
    parser.add_argument("--dog-threshold", type=_unit_interval, default=None, metavar="SCORE",
                        help="flag and order the rows by this dog-score threshold, as a label run with it would "
                             "(default: each row keeps the flag its run gave it)")
    parser.add_argument("--labeling-config", default=None, metavar="XML",
                        help="also write the Label Studio labeling interface the tasks fit")
    parser.add_argument("--model", default=None, metavar="BUNDLE",
                        help="take the breed list of --labeling-config from this bundle (default: the 120 "
                             "Stanford Dogs breeds)")


def _unit_interval(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text}: a dog score threshold is between 0 and 1")
    return value


def run(args: argparse.Namespace) -> int:
    from core import review, storage
    from core.breeds import STANFORD_DOGS
    from core.output import Output

    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {args.limit}")
    out = Output(args.out)
    if out.local and not os.path.isdir(out.root):  # what it needs is not there (exit 1), not a usage error
        raise StorageError(f"{args.out}: no such folder; give the --out of a label run")
    runs = out.finished_runs()
    parent, name = os.path.split(args.out.rstrip("/"))
    if not runs and name.startswith("run_id="):
        raise StorageError(f"{args.out}: one run's folder of the output {parent or '.'}; give the output itself "
                           f"(`breedlabel review {parent or '.'} ...`): its finished runs are read together")
    if not runs:
        raise StorageError(f"{args.out}: no finished labelling run there yet; run `breedlabel label ... --out "
                           f"{args.out}` first, or wait for the one running to finish")
    if args.labeling_config and args.model:  # a bad --model fails before anything is written
        from core.bundle import load_bundle

        names = [b.name for b in load_bundle(args.model).classes]
    else:
        names = [b.name for b in STANFORD_DOGS]
    queue = review.build_queue(out.read_finished(columns=list(review.COLUMNS)), threshold=args.dog_threshold,
                               run_thresholds=review.run_thresholds(runs), limit=args.limit,
                               local_files_root=args.local_files_root)
    storage.write_bytes(args.to, (json.dumps(queue.tasks, indent=1) + "\n").encode())
    if args.labeling_config:
        storage.write_bytes(args.labeling_config, review.labeling_config(names).encode())
    skipped = f"; {queue.skipped_members} archive members skipped (no URI to open)" if queue.skipped_members else ""
    print(f"{len(queue.tasks)} tasks of {queue.inputs} labelled inputs ({queue.rows} rows in {len(runs)} finished "
          f"run(s); an input labelled again is one task, its newest row), most uncertain first, written to "
          f"{args.to}{skipped}", file=sys.stderr)
    return EXIT_OK
