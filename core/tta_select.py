"""Which test-time average to export, measured: the trained model alone, with its mirror image,
with its twins at other input sizes, or both; every candidate's validation figures go to the card.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf

from core import console, registry
from core.config import TrainConfig
from core.evaluate import classification_metrics
from core.train_data import resize_view
from core.train_model import model_at_size, predict_with_progress, tta_sizes_of


def predict_probs(model, ds, progress=None) -> np.ndarray:
    return predict_with_progress(model, ds.map(lambda x, y: x), 0, "predicting", progress)


def metrics_from_probs(probs: np.ndarray, labels: np.ndarray, classes) -> dict:
    """{top1, top3, per_class, count} — the card's metrics, computed by core.evaluate."""
    m = classification_metrics(probs, labels, classes)
    return {k: m[k] for k in ("top1", "top3", "per_class", "count")}


def _resized_batch(size: int):
    return lambda x, y: (resize_view(x, size), y)


@dataclass
class Chosen:
    """The test-time average that measured best, its validation probabilities and, when asked
    for, the validation photos' pooled features averaged over the same views (what the graph's
    dog score reads: registry.view_features)."""

    model: Any
    flip: bool
    resized: list
    val_probs: np.ndarray
    val_features: np.ndarray | None = None

    def graph(self, **outputs):
        """The export graph (registry.with_tta), with `outputs` (temperature, dog_score) added."""
        return registry.with_tta(self.model, flip=self.flip, resized=self.resized, **outputs)


def final_metrics(model, cfg: TrainConfig, val, val_ds) -> tuple[Chosen, dict, dict]:
    """Metrics of the trained model and of each test-time average the config allows (its mirror
    with tta_flip, its twins at tta_sizes, both); the one that measures best is exported, on a
    tie the first of: none, mirror, sizes, both. With cfg.dog_score the head runs on each view's
    pooled features, which are kept, so the score's threshold needs no second pass over the
    photos. Returns (the choice, metrics, extras with every candidate's figures)."""
    labels, n = np.asarray(val.labels), len(val.classes)
    twins = {size: model_at_size(model, cfg, n, size) for size in tta_sizes_of(cfg)}
    probs: dict[tuple[int | None, bool], np.ndarray] = {}
    features: dict[tuple[int | None, bool], np.ndarray] = {}
    if cfg.dog_score:
        registry.require_head(model, "a dog score")
    mirrors = [False, True] if cfg.tta_flip else [False]
    passes = (1 + len(twins)) * len(mirrors)
    with console.Progress(len(labels) * passes, f"validation metrics ({passes} view(s) of each photo)") as progress:
        for size, net in [(None, model), *twins.items()]:
            ds = val_ds if size is None else val_ds.map(_resized_batch(size))
            for mirror in mirrors:
                view = ds.map(lambda x, y: (tf.reverse(x, axis=[2]), y)) if mirror else ds
                if cfg.dog_score:
                    features[(size, mirror)], probs[(size, mirror)] = _features_and_probs(net, view, progress)
                else:
                    probs[(size, mirror)] = predict_probs(net, view, progress)
    sizes = tuple(twins)
    candidates = [("no_tta", False, ())] + ([("flip_tta", True, ())] if cfg.tta_flip else [])
    if sizes:
        candidates.append(("sizes_tta", False, sizes))
        if cfg.tta_flip:
            candidates.append(("flip_sizes_tta", True, sizes))
    extras: dict = {}
    best = None
    for name, flip, with_sizes in candidates:
        views = [(s, f) for s in (None, *with_sizes) for f in ((False, True) if flip else (False,))]
        averaged = np.mean([probs[v] for v in views], axis=0)
        m = metrics_from_probs(averaged, labels, val.classes)
        extras.update({f"top1_{name}": m["top1"], f"top3_{name}": m["top3"]})
        if best is None or m["top1"] > best[0]["top1"]:
            best = (m, flip, with_sizes, averaged, views)
    metrics, flip, with_sizes, averaged, views = best
    extras.update(flip_tta=flip, tta_sizes=list(with_sizes))
    val_features = np.mean([features[v] for v in views], axis=0) if features else None
    return Chosen(model, flip, [(s, twins[s]) for s in with_sizes], averaged, val_features), metrics, extras


def _features_and_probs(net, ds, progress) -> tuple[np.ndarray, np.ndarray]:
    """One view's pooled features and its probabilities, the head run on those features: the
    same numbers as net(x), from one backbone pass."""
    features = predict_with_progress(registry.feature_extractor(net), ds.map(lambda x, y: x), 0, "", progress)
    features = features.astype(np.float32)
    return features, registry.head_of(net).predict(features, batch_size=1024, verbose=0)
