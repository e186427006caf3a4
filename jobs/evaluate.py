"""Measure a bundle on a folder-per-class dataset: top-1, top-3, per-class accuracy.

    breedlabel evaluate --model bundles/mobilenet_v2 --data ../shared/data/sample_bucket --out metrics.json

Single-process for now (the metric code is core.evaluate; a Ray version would only shard the paths).
Dataset classes are matched to the bundle's by id (wnid) then by name.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core import options
from core.errors import EXIT_OK, ConfigError, InputError
from core.options import option, positive_int
from core.predict import PredictConfig
from jobs.predict import add_runtime_argument

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateConfig:
    """evaluate's options (`breedlabel evaluate --help`), besides --model, --data and --runtime."""

    out: str | None = option(None, "write the metrics (with per-class accuracy and confusion counts) here",
                             metavar="METRICS_JSON")
    classes: str | None = option(None, "a number N (first N classes) or comma-separated class ids/names/folders")
    threads: int | None = option(PredictConfig.threads, "inference threads (default: all cores)", type=positive_int)
    batch_size: int = option(64, "images per inference call", type=positive_int)
    report: bool = option(True, "write report.html + plots/ next to the metrics JSON (needs --out)", negatable=True)
    history: str | None = option(None, "a training run's history.json, drawn as training curves in the report",
                                 metavar="HISTORY_JSON")
    not_dogs: str | None = option(None, "photos without a dog (each subfolder a group, e.g. cats/ objects/): report "
                                  "how well the bundle's dog score tells them from --data's dogs", metavar="DIR")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="BUNDLE", help="bundle path or URI")
    parser.add_argument("--data", required=True, metavar="DIR", action="append",
                        help="folder-per-class dataset; repeat it to compare sources (e.g. crops and full scenes) "
                             "side by side: each gets its own line, the report covers them all")
    options.add_options(parser, EvaluateConfig)
    add_runtime_argument(parser, PredictConfig.runtime)


def _class_selection(value: str | None) -> int | list[str] | None:
    if value is None:
        return None
    value = value.strip()
    return int(value) if value.isdigit() else [c.strip() for c in value.split(",") if c.strip()]


def _summary(metrics: dict, classes) -> str:
    lines = [f"images: {metrics['count']}", f"top-1:  {metrics['top1']:.2%}", f"top-3:  {metrics['top3']:.2%}"]
    by_source = metrics.get("by_source")
    if by_source:
        width = max(len(s) for s in by_source)
        lines.append(f"{'source':<{width}}  images   top-1   top-3")
        lines += [f"{s:<{width}}  {m['count']:6d}  {m['top1']:6.2%}  {m['top3']:6.2%}" for s, m in by_source.items()]
    nd = metrics.get("not_a_dog")
    if nd:
        lines.append(f"dog score (threshold {nd['threshold']:.2f}): {nd['dog_recall']:.1%} of dogs kept "
                     f"(top-1 probability at the same recall: threshold {nd['max_softmax']['threshold']:.3f})")
        for name, g in nd["groups"].items():
            lines.append(f"  {name}: {g['images']} images, AUROC {g['auroc']:.4f}, called dogs {g['called_dog']:.1%}"
                         f" | top-1 probability: AUROC {g['max_softmax']['auroc']:.4f}, called dogs "
                         f"{g['max_softmax']['called_dog']:.1%}")
    scored = [(acc, b) for b in classes if (acc := metrics["per_class"].get(b.id)) is not None]
    worst = sorted(scored, key=lambda t: t[0])[:5]
    if worst:
        lines.append("lowest per-class accuracy: " + ", ".join(f"{b.display} {a:.0%}" for a, b in worst))
    return "\n".join(lines)


def _by_source(result, sources: list[str], order: list[str], classes) -> dict:
    from core.evaluate import classification_metrics

    out = {}
    for source in order:
        rows = np.array([s == source for s in sources], bool)
        m = classification_metrics(result.probs[rows], result.labels[rows], classes)
        out[source] = {k: m[k] for k in ("count", "top1", "top3")}
    return out


def _not_dog_groups(folder: str) -> dict[str, list[Path]]:
    """The photos under `folder` by subfolder (one group when flat): checked before the long
    inference pass over --data, so a wrong --not-dogs fails in the first seconds."""
    from core.datasets import image_files

    root = Path(os.path.abspath(folder))  # as image_files makes its paths absolute
    if not root.is_dir():
        raise ConfigError(f"--not-dogs {folder}: not a folder; give a folder of photos without a dog")
    files = [Path(p) for p in image_files(root)]
    if not files:
        raise ConfigError(f"--not-dogs {folder}: no images there")
    groups: dict[str, list[Path]] = {}
    for path in files:
        rel = path.relative_to(root).parts
        groups.setdefault(rel[0] if len(rel) > 1 else root.name, []).append(path)
    return groups


def _score_not_dogs(predictor, folder: str, groups: dict[str, list[Path]]) -> dict[str, tuple]:
    """(dog scores, top-1 probabilities) of every readable image of `groups` (from
    `_not_dog_groups(folder)`), by group. Run before the pass over --data: a --not-dogs of
    unreadable files fails in seconds, not after it."""
    scored, unread = {}, []
    for name, paths in groups.items():
        results = [r for r in predictor.predict_paths([str(p) for p in paths], k=1) if r.ok]
        if not results:
            unread.append(f"breedlabel evaluate: --not-dogs {name}: none of its {len(paths)} photos could be read; "
                          "left out")
            continue
        scored[name] = (np.array([r.dog_score for r in results]), np.array([r.predictions[0].prob for r in results]))
    if not scored:
        total = sum(len(paths) for paths in groups.values())
        raise InputError(f"--not-dogs {folder}: none of its {total} photos could be read")
    for line in unread:
        print(line, file=sys.stderr)
    return scored


def _not_dogs(predictor, result, scored: dict[str, tuple]) -> tuple[dict, list]:
    """The not-dog scores (`_score_not_dogs`) measured against the dogs of `result`: the metrics
    and the report's histogram section."""
    from core import plots
    from core.evaluate import not_a_dog_metrics

    threshold = predictor.dog_threshold
    metrics = not_a_dog_metrics(result.dog_scores, result.probs.max(axis=1), scored, threshold)
    png = plots.score_histogram_png([("dogs", result.dog_scores), *((k, v[0]) for k, v in scored.items())], threshold)
    caption = (f"Dogs kept at the threshold: {metrics['dog_recall']:.1%}; "
               + "; ".join(f"{k} called dogs: {g['called_dog']:.1%} (AUROC {g['auroc']:.4f})"
                           for k, g in metrics["groups"].items()))
    return metrics, [("dog_score.png", "Not-a-dog score", caption, png)]


def _check_outputs(args: argparse.Namespace) -> None:
    """--out and --history, checked before the inference pass rather than after it."""
    from core import storage

    if args.out:
        if "://" in args.out:
            raise ConfigError(f"--out {args.out}: evaluate writes a local metrics file and report; give a local "
                              "path (and copy the folder to S3 afterwards)")
        if os.path.isdir(args.out):
            raise ConfigError(f"--out {args.out}: is a folder; give the metrics file's name, e.g. "
                              f"{os.path.join(args.out, 'metrics.json')} (the report goes next to it)")
        storage.check_writable_folder(os.path.dirname(os.path.abspath(args.out)), "the metrics (--out)")
    if args.history:
        try:
            json.loads(Path(args.history).read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"--history {args.history}: not a readable history.json ({e}); give the "
                              "history.json in the training run's checkpoint folder (<out>.run/)") from None


def _finite(value):
    """NaN and infinity (a metric with nothing to measure) as JSON null, which every parser reads."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def run(args: argparse.Namespace) -> int:
    from core import datasets
    from core.evaluate import evaluate_paths, map_labels
    from core.predict import Predictor

    sources = list(dict.fromkeys(args.data))  # the same folder twice is one source, counted once
    _check_outputs(args)
    predictor = Predictor(args.model, runtime=args.runtime, threads=args.threads, batch_size=args.batch_size)
    if args.not_dogs and predictor.dog_threshold is None:
        raise ConfigError(f"--not-dogs: the bundle {args.model} has no dog score (exported before it existed, or "
                          "trained with --no-dog-score)")
    not_dog_groups = _not_dog_groups(args.not_dogs) if args.not_dogs else {}
    selection = _class_selection(args.classes)
    paths, labels, source_of = [], [], {}
    for source in sources:
        ds = datasets.discover(source)
        if selection is not None:
            ds = datasets.select_classes(ds, selection)
        paths += [str(p) for p in ds.paths]
        labels += list(map_labels(ds.classes, predictor.classes)[ds.labels])
        source_of.update({str(p): source for p in ds.paths})
    not_dog_scores = _score_not_dogs(predictor, args.not_dogs, not_dog_groups) if args.not_dogs else {}
    result = evaluate_paths(predictor, paths, np.asarray(labels, np.int64))
    if not len(result.labels):
        reasons = ", ".join(sorted(set(result.errors.values()))) or "no images"
        raise InputError(f"--data: none of the {len(paths)} photos could be read ({reasons}); nothing to measure")
    data = sources[0] if len(sources) == 1 else sources
    metrics = dict(result.metrics, model_id=predictor.bundle.model_id, runtime=predictor.runtime.name,
                   data=data, errors=result.errors)
    if len(sources) > 1:
        metrics["by_source"] = _by_source(result, [source_of[p] for p in result.paths], sources, predictor.classes)
    calibration = predictor.bundle.card.get("calibration")
    if calibration:
        metrics["card_calibration"] = calibration
    extra_sections = []
    if args.not_dogs:
        metrics["not_a_dog"], extra_sections = _not_dogs(predictor, result, not_dog_scores)
    print(_summary(metrics, predictor.classes))
    for path, reason in sorted(result.errors.items()):
        print(f"breedlabel evaluate: skipped {path}: {reason}", file=sys.stderr)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(_finite(metrics), indent=2, allow_nan=False) + "\n")
        log.info("wrote %s", args.out)
        if args.report and result.probs is not None and len(result.labels):
            from core.report import write_report

            details = {"model_id": predictor.bundle.model_id, "data": ", ".join(sources)}
            for source, m in metrics.get("by_source", {}).items():
                details[f"top-1 / top-3 on {source}"] = f"{m['top1']:.2%} / {m['top3']:.2%} ({m['count']} images)"
            if calibration:
                details["validation ECE (card)"] = (f"{calibration['ece_before']:.3f} before, "
                                                    f"{calibration['ece_after']:.3f} after temperature "
                                                    f"{calibration['temperature']:.3f}")
            report = write_report(Path(args.out).parent, result.labels, result.probs, predictor.classes,
                                  image_paths=result.paths, history=args.history, details=details,
                                  extra_sections=extra_sections)
            print(f"report: {report.uri}")
    return EXIT_OK


if __name__ == "__main__":
    from jobs.cli import main

    sys.exit(main(["evaluate", *sys.argv[1:]]))
