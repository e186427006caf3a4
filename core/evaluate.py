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
    dog_scores: np.ndarray | None = field(default=None, repr=False)  # [N], a bundle with a dog score


def evaluate_paths(predictor, paths: Sequence[str], labels: np.ndarray, progress_every: int = 500) -> Evaluation:
    """Predict every path (in the predictor's batches) and score against bundle-indexed labels.

    Undecodable images are reported in `errors` and left out of the metrics.
    """
    labels = np.asarray(labels, np.int64)
    probs, kept, errors, dogs = [], [], {}, []
    step = predictor.batch_size
    for start in range(0, len(paths), step):
        results = predictor.predict_paths(paths[start:start + step], k=1, with_probs=True)
        for offset, res in enumerate(results):
            if res.ok:
                probs.append(res.probs)
                dogs.append(res.dog_score)
                kept.append(start + offset)
            else:
                errors[res.source] = res.error or "error"
        if progress_every and (start // step) % max(1, progress_every // step) == 0:
            log.info("evaluated %d/%d images", min(start + step, len(paths)), len(paths))
    num = len(predictor.classes)
    matrix = np.stack(probs) if probs else np.zeros((0, num), np.float32)
    scored = bool(dogs) and all(d is not None for d in dogs)
    return Evaluation(classification_metrics(matrix, labels[kept], predictor.classes), errors,
                      matrix, labels[kept], [str(paths[i]) for i in kept],
                      np.asarray(dogs, np.float32) if scored else None)


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a positive scores above a negative), ties counted half (Mann-Whitney U / (n_pos n_neg))."""
    pos, neg = np.asarray(positive, np.float64), np.asarray(negative, np.float64)
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    values = np.concatenate([pos, neg])
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    sorted_values = values[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_values, return_index=True, return_counts=True)
    average = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(average, counts)
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2.0
    return float(u / (len(pos) * len(neg)))


def not_a_dog_metrics(dog: np.ndarray, dog_msp: np.ndarray, others: dict[str, tuple[np.ndarray, np.ndarray]],
                      threshold: float) -> dict:
    """How well the dog score tells the dog photos (`dog`, their scores) from each group of
    non-dog photos (`others`: name -> (dog scores, top-1 probabilities)): AUROC, the share of dogs
    kept and of each group called a dog at the card's `threshold`; and, side by side, the same
    for the top-1 probability (`dog_msp`) at the threshold keeping the same share of dogs."""
    dog, dog_msp = np.asarray(dog, np.float64), np.asarray(dog_msp, np.float64)
    kept = float(np.mean(dog >= threshold)) if len(dog) else float("nan")
    msp_threshold = float(np.quantile(dog_msp, 1.0 - kept)) if len(dog_msp) else float("nan")
    out: dict = {"threshold": threshold, "dogs": int(len(dog)), "dog_recall": kept,
                 "max_softmax": {"threshold": msp_threshold, "dog_recall": float(np.mean(dog_msp >= msp_threshold))},
                 "groups": {}}
    for name, (scores, msp) in others.items():
        out["groups"][name] = {
            "images": int(len(scores)), "auroc": auroc(dog, scores),
            "called_dog": float(np.mean(np.asarray(scores) >= threshold)),
            "max_softmax": {"auroc": auroc(dog_msp, msp),
                            "called_dog": float(np.mean(np.asarray(msp) >= msp_threshold))},
        }
    return out
