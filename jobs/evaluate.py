"""Measure a bundle on a folder-per-class dataset: top-1, top-3, per-class accuracy.

    breedlabel evaluate --model bundles/mobilenet_v2 --data ../shared/data/sample_bucket --out metrics.json

Single-process for now (the metric code is core.evaluate; a Ray version would only shard the paths).
Dataset classes are matched to the bundle's by id (wnid) then by name.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from core.errors import EXIT_OK
from core.predict import PredictConfig
from jobs.predict import add_runtime_argument

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateConfig:
    """Defaults for evaluate (shown by `breedlabel evaluate --help`)."""

    out: str | None = None
    classes: str | None = None
    runtime: str = PredictConfig.runtime
    threads: int | None = PredictConfig.threads
    batch_size: int = 64
    report: bool = True
    history: str | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = EvaluateConfig()
    parser.add_argument("--model", required=True, metavar="BUNDLE", help="bundle path or URI")
    parser.add_argument("--data", required=True, metavar="DIR", help="folder-per-class dataset")
    parser.add_argument("--out", default=d.out, metavar="METRICS_JSON",
                        help="write the metrics (with per-class accuracy and confusion counts) here")
    parser.add_argument("--classes", default=d.classes,
                        help="a number N (first N classes) or comma-separated class ids/names/folders")
    add_runtime_argument(parser, d.runtime)
    parser.add_argument("--threads", type=int, default=d.threads, help="inference threads (default: all cores)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="images per inference call")
    parser.add_argument("--report", action=argparse.BooleanOptionalAction, default=d.report,
                        help="write report.html + plots/ next to the metrics JSON (needs --out)")
    parser.add_argument("--history", default=d.history, metavar="HISTORY_JSON",
                        help="a training run's history.json, drawn as training curves in the report")


def _class_selection(value: str | None) -> int | list[str] | None:
    if value is None:
        return None
    value = value.strip()
    return int(value) if value.isdigit() else [c.strip() for c in value.split(",") if c.strip()]


def _summary(metrics: dict, classes) -> str:
    lines = [f"images: {metrics['count']}", f"top-1:  {metrics['top1']:.2%}", f"top-3:  {metrics['top3']:.2%}"]
    scored = [(acc, b) for b in classes if (acc := metrics["per_class"].get(b.id)) is not None]
    worst = sorted(scored, key=lambda t: t[0])[:5]
    if worst:
        lines.append("lowest per-class accuracy: " + ", ".join(f"{b.display} {a:.0%}" for a, b in worst))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from core import datasets
    from core.evaluate import evaluate_paths, map_labels
    from core.predict import Predictor

    ds = datasets.discover(args.data)
    selection = _class_selection(args.classes)
    if selection is not None:
        ds = datasets.select_classes(ds, selection)
    predictor = Predictor(args.model, runtime=args.runtime, threads=args.threads, batch_size=args.batch_size)
    mapping = map_labels(ds.classes, predictor.classes)
    result = evaluate_paths(predictor, list(ds.paths), mapping[ds.labels])
    metrics = dict(result.metrics, model_id=predictor.bundle.model_id, runtime=predictor.runtime.name,
                   data=str(args.data), errors=result.errors)
    print(_summary(metrics, predictor.classes))
    for path, reason in sorted(result.errors.items()):
        print(f"breedlabel evaluate: skipped {path}: {reason}", file=sys.stderr)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(metrics, indent=2) + "\n")
        log.info("wrote %s", args.out)
        if args.report and result.probs is not None and len(result.labels):
            from core.report import write_report

            report = write_report(Path(args.out).parent, result.labels, result.probs, predictor.classes,
                                  image_paths=result.paths, history=args.history,
                                  details={"model_id": predictor.bundle.model_id, "data": str(args.data)})
            print(f"report: {report.uri}")
    return EXIT_OK


if __name__ == "__main__":
    from jobs.cli import main

    sys.exit(main(["evaluate", *sys.argv[1:]]))
