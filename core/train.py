"""Two-phase training in one process, and the bundle it exports.

A head on the frozen backbone, then fine-tuning of its top layers, in one of three ways the
config chooses (`training_path`):

- "on the fly": both phases decode and augment every epoch (the GPU way);
- "cached head": the head trains on cached features of a few views (core.feature_cache),
  the fine-tune decodes and augments every epoch;
- "cached": both phases train on one cache of the activations below the fine-tuned layers.

Then the validation split is measured through the full exported graph, choosing the
test-time average to export (core.tta_select), and `export_trained` writes the bundle with its
card. The pieces live in core.train_data, core.train_model, core.feature_cache and
core.tta_select; jobs.train_distributed reuses them over Ray Train workers.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import tf_keras as keras

from core import bundle as bundles
from core import calibration, datasets, registry
from core.config import DOG_SCORE_IMAGENET, HEAD_INIT_IMAGENET, PHASE_FINETUNE, PHASE_HEAD, PHASES, TrainConfig
from core.dog_score import dog_score_layer, fit_dog_score, fit_dog_vs_not, fit_imagenet_mass
from core.errors import ConfigError
from core.head_init import apply_rows, card_entry, pick_rows
from core.feature_cache import (cache_features, train_head_on_features, train_on_cached_activations,
                                uses_cached_finetune)
from core.train_data import build_datasets, named_input_errors, split_data, steps_per_epoch
from core.train_model import (
    HISTORY_FILE,
    TrainRun,
    build_model,
    compile_for_phase,
    input_size_of,
    phase_callbacks,
    run_phase,
    setup_precision,
)
from core.tta_select import final_metrics

log = logging.getLogger(__name__)

CONFIG_FILE = "train_config.json"
PATH_ON_THE_FLY, PATH_CACHED_HEAD, PATH_CACHED = "on the fly", "cached head", "cached"


@dataclass
class TrainResult:
    model: Any  # keras.Model, the one to export (with the test-time average that measured best)
    classes: list
    history: dict
    metrics: dict
    config: TrainConfig
    extras: dict = field(default_factory=dict)  # every candidate's metrics, timings
    card: dict = field(default_factory=dict)  # the card's dog_score and calibration entries


def training_path(cfg: TrainConfig) -> str:
    if uses_cached_finetune(cfg):
        return PATH_CACHED
    if cfg.head_feature_views > 0 and cfg.weights is not None:
        return PATH_CACHED_HEAD
    return PATH_ON_THE_FLY


def train_phases(model, run: TrainRun, train_ds, val_ds) -> None:
    """Head then fine-tune, each epoch decoding + augmenting on the fly (the head on cached
    pooled features on the "cached head" path); timings go to run.timings."""
    cfg = run.cfg
    steps = steps_per_epoch(cfg, len(run.train.paths))
    if cfg.max_steps_per_epoch:
        train_ds = train_ds.repeat()
    for phase in PHASES:
        t0 = time.time()
        if phase == PHASE_FINETUNE and cfg.finetune_layers == 0:
            continue
        if phase == PHASE_HEAD and training_path(cfg) == PATH_CACHED_HEAD:
            train_head_on_features(model, run)
        else:
            if phase == PHASE_HEAD and cfg.head_init == HEAD_INIT_IMAGENET:
                warm_start_on_the_fly(model, run)
            compile_for_phase(model, cfg, phase, steps)
            cbs = phase_callbacks(run, phase, run.best(PHASE_HEAD))
            run.history[phase] = run_phase(model, cfg, phase, train_ds, val_ds, cbs, steps=steps)
        run.timings[f"{phase}_s"] = round(time.time() - t0, 1)


def training_photo_rows(cfg: TrainConfig, model, train_set, why: str) -> list[int]:
    """core.head_init's ImageNet row of each class, from one plain backbone pass over the training
    photos (where no cached features are at hand); `why` names the pass in its progress line."""
    x, y = cache_features(cfg, registry.feature_extractor(model), train_set, 0,
                          desc=f"{why}: features of the training photos", dtype=np.float32)
    return [int(r) for r in pick_rows(cfg.backbone, cfg.weights, x, y, len(train_set.classes))]


def warm_start_on_the_fly(model, run: TrainRun) -> None:
    """core.head_init's warm start where the head trains on the fly."""
    cfg = run.cfg
    rows = training_photo_rows(cfg, model, run.train, "head init")
    apply_rows(model, cfg.backbone, cfg.weights, rows)
    run.card["head_init"] = card_entry(rows, run.train.classes)


def head_init_rows(cfg: TrainConfig, data) -> tuple[list[int], dict]:
    """The ImageNet rows of core.head_init for a run whose workers start their heads from them
    (train --workers, tune), picked here; returns the rows and the card's `head_init` entry."""
    train_set, _ = split_data(cfg, data)
    rows = training_photo_rows(cfg, build_model(cfg, len(train_set.classes)), train_set, "head init")
    return rows, card_entry(rows, train_set.classes)


def train(cfg: TrainConfig, data, *, callbacks: Sequence = (), checkpoint_dir: str | None = None) -> TrainResult:
    """Both phases in this process, then final metrics on the validation split (always through
    the full exported graph on decoded validation images, whichever way training ran)."""
    keras.utils.set_random_seed(cfg.seed)
    setup_precision(cfg)
    train_set, val_set = split_data(cfg, data)
    if checkpoint_dir:
        Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
        (Path(checkpoint_dir) / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=1))
    run = TrainRun(cfg, train_set, val_set, checkpoint_dir, callbacks)
    model = build_model(cfg, run.num_classes)
    train_ds, val_ds = build_datasets(cfg, train_set, val_set)
    with named_input_errors():
        if training_path(cfg) == PATH_CACHED:
            train_on_cached_activations(model, run)
        else:
            train_phases(model, run, train_ds, val_ds)
        t0 = time.time()
        result = measure_for_export(model, cfg, train_set, val_set, val_ds, head_init=run.card.get("head_init"))
    run.timings["final_metrics_s"] = round(time.time() - t0, 1)
    result.extras["timings"] = run.timings
    result.card.update(run.card)
    result.history = run.history
    if checkpoint_dir:
        (Path(checkpoint_dir) / HISTORY_FILE).write_text(json.dumps(run.history, indent=1))
    log.info("validation top-1 %.4f top-3 %.4f (%s)", result.metrics["top1"], result.metrics["top3"], result.extras)
    return result


def not_dog_folder(folder: str) -> datasets.ImageFolder:
    """Every image under `folder` (any layout) as one class: the negatives of `--not-dogs`."""
    from core.breeds import Breed

    paths = datasets.image_files(folder)
    if not paths:
        raise ConfigError(f"--not-dogs {folder}: no images there; give a folder of photos without a dog")
    return datasets.ImageFolder(paths, np.zeros(len(paths), np.int64), [Breed("not_a_dog", "not_a_dog")],
                                os.path.abspath(folder))


def dog_score_training_features(cfg: TrainConfig, chosen, train_set) -> tuple[np.ndarray, np.ndarray]:
    """Pooled features of each training photo at the input size and at every size the exported
    graph also scores (chosen.resized, through that size's twin), stacked, with their labels: the
    breed Gaussians then span the sizes the dog score reads. On the mobilenet_v2 preset this kept
    more whole photos as dogs than fitting on the input size alone, at the same threshold rule and
    share of cats (figures in issue 14's closing note); the mirror images added little for a
    second pass, so they are left out."""
    xs = []
    for size, net in [(None, chosen.model), *chosen.resized]:
        where = "" if size is None else f" at {size} px"
        x, _ = cache_features(cfg, registry.feature_extractor(net), train_set, 0, view_size=size,
                              desc=f"dog score: features of the training photos{where}",
                              dtype=np.float32)  # float32: features of an untrained CNN overflow float16
        xs.append(x)
    return np.concatenate(xs), np.tile(np.asarray(train_set.labels), len(xs))


def imagenet_dog_score(cfg: TrainConfig, chosen, train_set, val_x: np.ndarray, head_init: dict | None):
    """core.dog_score.fit_imagenet_mass on the backbone's ImageNet classifier, over the rows the
    classes took when the head was warm-started (or, without that, the rows their training
    photos pick now: one more backbone pass)."""
    found = registry.imagenet_classifier(cfg.backbone, cfg.weights)
    if found is None:
        raise ConfigError(f"dog_score_method imagenet: the weights of {cfg.backbone} ({cfg.weights}) have no "
                          "ImageNet classifier; use dog_score_method mahalanobis")
    kernel, bias = found
    if head_init is not None:
        rows = [head_init["rows"][c.id] for c in train_set.classes]
    else:
        rows = training_photo_rows(cfg, chosen.model, train_set, "dog score")
    return fit_imagenet_mass(kernel, bias, np.asarray(rows), val_x)


def measure_for_export(model, cfg: TrainConfig, train_set, val_set, val_ds, *,
                       head_init: dict | None = None) -> TrainResult:
    """The graph to export and what its card says, for a trained model (single-process or
    distributed): the test-time average that measures best on the validation split, then the
    temperature fitted on its validation probabilities and the dog score fitted on pooled
    features (class means and covariances of the training photos at the graph's sizes; threshold
    of the validation photos' features averaged over the exported views, as the graph computes
    them), both inside the graph."""
    chosen, metrics, extras = final_metrics(model, cfg, val_set, val_ds)
    outputs, card = {}, {}
    if cfg.calibrate:
        card[bundles.CARD_CALIBRATION] = calibration.calibrate(np.asarray(val_set.labels), chosen.val_probs)
        outputs["temperature"] = calibration.temperature_layer(card[bundles.CARD_CALIBRATION]["temperature"])
        log.info("calibration: temperature %.3f, validation ECE %.4f -> %.4f (cross-fitted %.4f)",
                 *(card[bundles.CARD_CALIBRATION][k] for k in ("temperature", "ece_before", "ece_after",
                                                               "ece_after_crossfit")))
    if cfg.dog_score:
        val_x = chosen.val_features  # averaged over the exported views, as the graph computes them
        if cfg.not_dogs:
            extractor = registry.feature_extractor(model)
            train_x, _ = cache_features(cfg, extractor, train_set, 0, desc="dog score: features of the training photos",
                                        dtype=np.float32)  # float32: features of an untrained CNN overflow float16
            others = not_dog_folder(cfg.not_dogs)
            other_x, _ = cache_features(cfg, extractor, others, 0, desc="dog score: features of --not-dogs",
                                        dtype=np.float32)
            fit = fit_dog_vs_not(train_x, other_x, val_x)
            fit.card["not_dogs_fingerprint"] = datasets.fingerprint(others)
        elif cfg.dog_score_method == DOG_SCORE_IMAGENET:
            fit = imagenet_dog_score(cfg, chosen, train_set, val_x, head_init)
        else:
            train_x, train_y = dog_score_training_features(cfg, chosen, train_set)
            sizes = " and ".join(f"{size} px" for size in [input_size_of(cfg), *(s for s, _ in chosen.resized)])
            fit = fit_dog_score(train_x, train_y, val_x, num_classes=len(train_set.classes),
                                photos=f"{len(train_set)} training photos at {sizes}")
        card[bundles.CARD_DOG_SCORE] = fit.card
        outputs["dog_score"] = dog_score_layer(fit)
        log.info("dog score: %s, threshold %.2f (%s)", fit.card["method"], fit.card["threshold"],
                 fit.card["threshold_rule"])
    return TrainResult(chosen.graph(**outputs), list(train_set.classes), {}, metrics, cfg, extras, card)


def export_trained(result: TrainResult, out: str, data, *, distributed: dict | None = None) -> bundles.Bundle:
    """The bundle of a training run, single-process or distributed (`distributed`: the Ray Train
    settings): the model to export, its classes, and a card with the resolved config, the data
    fingerprint, every measured figure, the history and the timings."""
    metrics = {**result.metrics, **{k: v for k, v in result.extras.items() if k != "timings"}}
    extra = {"backbone": result.config.backbone, "train_config": result.config.to_dict(),
             "data_fingerprint": datasets.fingerprint(data), "metrics": metrics, "history": result.history,
             "timings": result.extras.get("timings", {}), "training": {"distributed": distributed is not None},
             **result.card}
    if distributed is not None:
        extra["distributed"] = distributed
    log.info("exporting the bundle to %s (SavedModel, then checks)", out)  # tens of seconds on 2 cores
    return bundles.export_bundle(result.model, result.classes, out, input_size=input_size_of(result.config),
                                 resize_policy=result.config.resize_policy, card_extra=extra)
