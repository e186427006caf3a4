"""The model and its optimisation: build it, its twins at other input sizes, what trains in
each phase, the learning-rate schedule, compile, one `fit`, and the callbacks every phase uses
(early stopping on validation top-1 with best-weights restore, checkpoints, history).

`TrainRun` is what the phases of one run share, so the training paths (core.train,
core.feature_cache, jobs.train_distributed) pass one object instead of seven arguments.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import tensorflow as tf
import numpy as np
import tf_keras as keras

from core import console, registry, stop
from core.config import PHASE_HEAD, PHASES, TrainConfig
from core.errors import ConfigError

TOP1 = "top1"
TOP3 = "top3"
MONITOR = f"val_{TOP1}"
HISTORY_FILE = "history.json"


@dataclass
class TrainRun:
    """What the phases of one training run share: the config, the split, where epochs are saved,
    extra Keras callbacks, and what the phases record (history per phase, timings in s)."""

    cfg: TrainConfig
    train: Any  # core.datasets.ImageFolder
    val: Any
    checkpoint_dir: str | None = None
    callbacks: Sequence = ()
    history: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    card: dict = field(default_factory=dict)  # card entries the phases add (head_init)

    @property
    def num_classes(self) -> int:
        return len(self.train.classes)

    def best(self, phase: str = PHASE_HEAD) -> float | None:
        """The phase's best validation top-1 so far (a later phase must beat it)."""
        return max(self.history.get(phase, {}).get(MONITOR, []), default=None)


def gpu_available() -> bool:
    return bool(tf.config.list_physical_devices("GPU"))


def setup_precision(cfg: TrainConfig) -> str:
    """mixed_float16 only when a GPU is present (on CPU it is slower); returns the policy."""
    policy = "mixed_float16" if cfg.mixed_precision and gpu_available() else "float32"
    keras.mixed_precision.set_global_policy(policy)
    return policy


def input_size_of(cfg: TrainConfig) -> int:
    return int(cfg.input_size or registry.get_spec(cfg.backbone).input_size)


def tta_sizes_of(cfg: TrainConfig) -> list[int]:
    """The other input sizes the model also sees each photo at (cfg.tta_sizes but the input size)."""
    return [s for s in cfg.tta_sizes if s != input_size_of(cfg)]


def build_model(cfg: TrainConfig, num_classes: int, name_suffix: str = ""):
    return registry.create_model(
        cfg.backbone, num_classes, weights=cfg.weights, input_size=cfg.input_size,
        dense_units=cfg.dense_units, dropout=cfg.dropout, grayscale=cfg.grayscale, equalize=cfg.equalize,
        name_suffix=name_suffix)


def model_at_size(model, cfg: TrainConfig, num_classes: int, size: int):
    """A twin of `model` with the same weights whose input is `size` px: every backbone here is
    fully convolutional with global pooling, so one set of weights serves any size."""
    twin = build_model(cfg.without_weights(input_size=size, tta_sizes=()), num_classes, f"_{size}px")
    twin.set_weights(model.get_weights())
    return twin


def set_trainable(model, cfg: TrainConfig, phase: str, top: int | None = None) -> int:
    """Freeze/unfreeze for a phase; returns the number of trainable backbone layers.

    head: backbone frozen (custom_cnn trains whole when finetune_layers == 0: nothing to reuse).
    finetune: top `finetune_layers` (or `top`, or all) backbone layers train; BatchNorm stays frozen.
    """
    if phase not in PHASES:
        raise ConfigError(f"unknown phase {phase!r}; valid: {', '.join(PHASES)}")
    backbone = registry.backbone_of(model)
    from_scratch = phase == PHASE_HEAD and cfg.weights is None
    if phase == PHASE_HEAD and not from_scratch:
        backbone.trainable = False
        return 0
    backbone.trainable = True
    layers = backbone.layers
    n = len(layers) if (from_scratch or cfg.finetune_layers < 0) else min(top or cfg.finetune_layers, len(layers))
    for i, layer in enumerate(layers):
        layer.trainable = i >= len(layers) - n
        if cfg.freeze_bn and isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    return sum(1 for layer in layers if layer.trainable and layer.weights)


def load_phase_weights(model, cfg: TrainConfig, phase: str, path: str) -> None:
    """Load weights a model saved (Keras .h5) during `phase`, into a model built afresh.

    An .h5 file keeps each top-level layer's weights as one list, trainable ones first, and the
    backbone is one such layer: during fine-tuning (part of it frozen, BatchNorm frozen) or behind a
    frozen backbone its weights are listed in another order than a fresh model's, and loading them
    as they are fails ("axes don't match array") or, where shapes agree, crosses them. So the
    phase's trainability is set before loading."""
    if registry.BACKBONE_LAYER in [layer.name for layer in model.layers]:
        set_trainable(model, cfg, phase)
    model.load_weights(path)


class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to `peak`, then cosine decay to 0 at `total_steps`."""

    def __init__(self, peak: float, total_steps: int, warmup_steps: int = 0):
        self.peak, self.total_steps, self.warmup_steps = float(peak), int(max(total_steps, 1)), int(warmup_steps)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warm = tf.cast(max(self.warmup_steps, 1), tf.float32)
        total = tf.cast(self.total_steps, tf.float32)
        progress = tf.clip_by_value((step - self.warmup_steps) / tf.maximum(total - self.warmup_steps, 1.0), 0, 1)
        cosine = 0.5 * self.peak * (1.0 + tf.cos(math.pi * progress))
        return tf.where(step < self.warmup_steps, self.peak * (step + 1.0) / warm, cosine)

    def get_config(self):
        return {"peak": self.peak, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps}


def phase_schedule(cfg: TrainConfig, phase: str, steps: int) -> WarmupCosine:
    epochs = cfg.head_epochs if phase == PHASE_HEAD else cfg.finetune_epochs
    lr = cfg.head_lr if phase == PHASE_HEAD else cfg.finetune_lr
    warmup = 0 if phase == PHASE_HEAD else int(cfg.warmup_epochs * steps)
    return WarmupCosine(lr, max(epochs, 1) * steps, warmup)


def compile_for_phase(model, cfg: TrainConfig, phase: str, steps: int) -> None:
    """Set trainability and (re)compile: AdamW + warm-up/cosine, smoothed CE, top-1/top-3."""
    if registry.BACKBONE_LAYER in [layer.name for layer in model.layers]:
        set_trainable(model, cfg, phase)
    optimizer = keras.optimizers.AdamW(learning_rate=phase_schedule(cfg, phase, steps), weight_decay=cfg.weight_decay)
    model.compile(optimizer=optimizer, loss=keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing),
                  metrics=[keras.metrics.CategoricalAccuracy(name=TOP1),
                           keras.metrics.TopKCategoricalAccuracy(k=3, name=TOP3)])


class HistoryWriter(keras.callbacks.Callback):
    """Append each epoch's logs to a JSON file (readable while training runs)."""

    def __init__(self, path: str | os.PathLike, phase: str, history: dict):
        super().__init__()
        self.path, self.phase, self.history = Path(path), phase, history

    def on_epoch_end(self, epoch, logs=None):
        entry = self.history.setdefault(self.phase, {})
        for key, value in (logs or {}).items():
            entry.setdefault(key, []).append(float(value))
        self.path.write_text(json.dumps(self.history, indent=1))


class BestRestore(keras.callbacks.EarlyStopping):
    """EarlyStopping on val top-1 whose starting point may be the previous phase's best:
    a fine-tune that never beats the head it started from gives that head back."""

    def __init__(self, patience: int, initial_best: float | None = None):
        super().__init__(monitor=MONITOR, mode="max", patience=patience, restore_best_weights=True, verbose=1)
        self.initial_best = initial_best

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self.initial_best is not None:
            self.best = self.initial_best
            self.best_weights = self.model.get_weights()
            self.best_epoch = -1


class PollStop(keras.callbacks.Callback):
    """After every batch, `core.stop.poll()`: a SIGTERM whose `Stopped` TensorFlow swallowed still
    ends the fit within a batch."""

    def on_train_batch_end(self, batch, logs=None):
        stop.poll()

    def on_test_batch_end(self, batch, logs=None):
        stop.poll()


def phase_callbacks(run: TrainRun, phase: str, initial_best: float | None = None) -> list:
    """Early stopping on val top-1 with best restore, per-epoch checkpoints + history JSON, a stop
    poll, and the run's own callbacks."""
    cbs: list = [BestRestore(run.cfg.early_stopping_patience, initial_best), PollStop()]
    if run.checkpoint_dir:
        Path(run.checkpoint_dir).mkdir(parents=True, exist_ok=True)
        pattern = str(Path(run.checkpoint_dir) / f"{phase}-epoch{{epoch:02d}}.weights.h5")
        cbs.append(keras.callbacks.ModelCheckpoint(pattern, save_weights_only=True))
        cbs.append(HistoryWriter(Path(run.checkpoint_dir) / HISTORY_FILE, phase, run.history))
    return cbs + list(run.callbacks)


def run_phase(model, cfg: TrainConfig, phase: str, train_ds, val_ds, callbacks: Sequence = (),
              steps: int | None = None, verbose: int = 2) -> dict:
    """model.fit for one phase (model already compiled for it); returns its history dict."""
    epochs = cfg.head_epochs if phase == PHASE_HEAD else cfg.finetune_epochs
    if epochs <= 0:
        return {}
    fit = model.fit(train_ds, validation_data=val_ds, epochs=epochs, steps_per_epoch=steps,
                    callbacks=list(callbacks), verbose=verbose)
    return {k: [float(v) for v in vals] for k, vals in fit.history.items()}


class _PredictProgress(keras.callbacks.Callback):
    """Feeds model.predict's batches into a console.Progress."""

    def __init__(self, progress):
        super().__init__()
        self.progress = progress

    def on_predict_batch_end(self, batch, logs=None):
        outputs = (logs or {}).get("outputs")
        if outputs is not None:
            self.progress.update(len(tf.nest.flatten(outputs)[0]))


def predict_with_progress(model, data, total: int, desc: str, progress=None) -> np.ndarray:
    """model.predict over `data` (`total` rows) with counts and time left; into `progress` when
    given (one line for several passes), else its own."""
    if progress is not None:
        return model.predict(data, verbose=0, callbacks=[_PredictProgress(progress)])
    with console.Progress(total, desc) as own:
        return model.predict(data, verbose=0, callbacks=[_PredictProgress(own)])
