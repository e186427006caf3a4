"""Classification metrics (pure numpy) and a bundle-on-dataset evaluation loop.

The same numbers go into card.json (`metrics`), `breedlabel evaluate` and the report, so they
are computed in one place: top-1, top-3, per-class accuracy and confusion counts.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from core.breeds import Breed
from core.errors import InputError

log = logging.getLogger(__name__)


def top_k_accuracy(probs: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of rows whose true label is among the k highest probabilities (nan if empty)."""
    probs, labels = np.asarray(probs), np.asarray(labels)
    if len(labels) == 0:
        return float("nan")
    k = min(k, probs.shape[1])
    top = np.argpartition(-probs, k - 1, axis=1)[:, :k]
    return float(np.mean(np.any(top == labels[:, None], axis=1)))


def confusion_counts(predicted: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """[true, predicted] counts, int64 [C, C]."""
    out = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(out, (np.asarray(labels, np.int64), np.asarray(predicted, np.int64)), 1)
    return out


def per_class_accuracy(confusion: np.ndarray) -> np.ndarray:
    """Recall per true class; nan for a class with no samples."""
    totals = confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, np.diag(confusion) / np.maximum(totals, 1), np.nan)


def classification_metrics(probs: np.ndarray, labels: np.ndarray, classes: Sequence[Breed]) -> dict:
    """{"count", "top1", "top3", "per_class": {id: acc|None}, "confusion": [[...]]} — JSON-able."""
    probs = np.asarray(probs, np.float32)
    labels = np.asarray(labels, np.int64)
    if probs.shape != (len(labels), len(classes)):
        raise InputError(f"metrics: probabilities {list(probs.shape)} do not match "
                         f"{len(labels)} labels x {len(classes)} classes")
    confusion = confusion_counts(probs.argmax(axis=1) if len(labels) else labels, labels, len(classes))
    per_class = per_class_accuracy(confusion)
    return {
        "count": int(len(labels)),
        "top1": top_k_accuracy(probs, labels, 1),
        "top3": top_k_accuracy(probs, labels, 3),
        "per_class": {b.id: (None if np.isnan(a) else float(a)) for b, a in zip(classes, per_class)},
        "support": {b.id: int(n) for b, n in zip(classes, confusion.sum(axis=1))},
        "confusion": confusion.tolist(),
    }


def map_labels(dataset_classes: Sequence[Breed], bundle_classes: Sequence[Breed]) -> np.ndarray:
    """Index of each dataset class in the bundle's class list, matched by id then by name."""
    by_id = {b.id: i for i, b in enumerate(bundle_classes)}
    by_name = {b.name: i for i, b in enumerate(bundle_classes)}
    mapping, unknown = [], []
    for c in dataset_classes:
        idx = by_id.get(c.id, by_name.get(c.name))
        mapping.append(-1 if idx is None else idx)
        if idx is None:
            unknown.append(c.id if c.id == c.name else f"{c.id}-{c.name}")
    if unknown:
        raise InputError(f"the dataset has classes the bundle does not know: {unknown[:10]}"
                         f"{' ...' if len(unknown) > 10 else ''}; choose known ones with --classes")
    return np.asarray(mapping, np.int64)


@dataclass
class Evaluation:
    metrics: dict
    errors: dict[str, str] = field(default_factory=dict)  # path -> reason for undecodable images
    # the scored rows, for the report (core.report): probs [N, C], bundle-indexed labels, paths
    probs: np.ndarray | None = field(default=None, repr=False)
    labels: np.ndarray | None = field(default=None, repr=False)
    paths: list[str] = field(default_factory=list, repr=False)


def evaluate_paths(predictor, paths: Sequence[str], labels: np.ndarray, progress_every: int = 500) -> Evaluation:
    """Predict every path (in the predictor's batches) and score against bundle-indexed labels.

    Undecodable images are reported in `errors` and left out of the metrics.
    """
    labels = np.asarray(labels, np.int64)
    probs, kept, errors = [], [], {}
    step = predictor.batch_size
    for start in range(0, len(paths), step):
        results = predictor.predict_paths(paths[start:start + step], k=1, with_probs=True)
        for offset, res in enumerate(results):
            if res.ok:
                probs.append(res.probs)
                kept.append(start + offset)
            else:
                errors[res.source] = res.error or "error"
        if progress_every and (start // step) % max(1, progress_every // step) == 0:
            log.info("evaluated %d/%d images", min(start + step, len(paths)), len(paths))
    num = len(predictor.classes)
    matrix = np.stack(probs) if probs else np.zeros((0, num), np.float32)
    return Evaluation(classification_metrics(matrix, labels[kept], predictor.classes), errors,
                      matrix, labels[kept], [str(paths[i]) for i in kept])
