"""Two-phase training: a head on the frozen backbone, then fine-tuning its top layers.

Built from small functions a distributed runner (Ray Train + MultiWorkerMirroredStrategy)
reuses instead of writing a second loop:

    train_ds, val_ds = build_datasets(cfg, train, val, global_batch)
    with strategy.scope():
        model = build_model(cfg, num_classes)
        compile_for_phase(model, cfg, PHASE_HEAD, steps_per_epoch)
    run_phase(model, cfg, PHASE_HEAD, train_ds, val_ds, callbacks=[report_callback])

`train(cfg, data)` is the single-process driver; it can also train the head on cached
features of augmented views (fast on CPU) before the on-the-fly fine-tune.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

from core import augment as aug  # noqa: E402
from core import registry  # noqa: E402
from core.config import PHASE_FINETUNE, PHASE_HEAD, PHASES, TrainConfig  # noqa: E402
from core.errors import ConfigError  # noqa: E402

log = logging.getLogger(__name__)

TOP1 = "top1"
TOP3 = "top3"
MONITOR = f"val_{TOP1}"
HISTORY_FILE = "history.json"
CONFIG_FILE = "train_config.json"


@dataclass
class TrainResult:
    model: Any  # keras.Model, the one to export (flip-TTA wrapped when that measured better)
    classes: list
    history: dict
    metrics: dict
    config: TrainConfig
    extras: dict = field(default_factory=dict)  # e.g. metrics without TTA, timings


# ---------------------------------------------------------------- environment
def gpu_available() -> bool:
    return bool(tf.config.list_physical_devices("GPU"))


def setup_precision(cfg: TrainConfig) -> str:
    """mixed_float16 only when a GPU is present (on CPU it is slower); returns the policy."""
    policy = "mixed_float16" if cfg.mixed_precision and gpu_available() else "float32"
    keras.mixed_precision.set_global_policy(policy)
    return policy


def input_size_of(cfg: TrainConfig) -> int:
    return int(cfg.input_size or registry.get_spec(cfg.backbone).input_size)


# ---------------------------------------------------------------- data
def load_image(path: tf.Tensor, size: int, policy: str = "resize_crop") -> tf.Tensor:
    """Read + decode with tf.io, then the card's resize policy; uint8 [size,size,3]."""
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    if policy == "resize_crop":
        h = tf.cast(tf.shape(image)[0], tf.float32)
        w = tf.cast(tf.shape(image)[1], tf.float32)
        scale = float(size) / tf.minimum(h, w)
        nh = tf.maximum(size, tf.cast(tf.round(h * scale), tf.int32))
        nw = tf.maximum(size, tf.cast(tf.round(w * scale), tf.int32))
        image = tf.image.resize(image, (nh, nw), antialias=True)
        image = tf.image.resize_with_crop_or_pad(image, size, size)
    else:
        image = tf.image.resize(image, (size, size), antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def _decoded(cfg: TrainConfig, folder, size: int) -> tf.data.Dataset:
    """(uint8 image, int label) pairs, decoded once and cached in memory if configured."""
    ds = tf.data.Dataset.from_tensor_slices((list(folder.paths), np.asarray(folder.labels, np.int32)))
    ds = ds.map(lambda p, y: (load_image(p, size, cfg.resize_policy), y), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.cache() if cfg.cache_images else ds


def build_datasets(cfg: TrainConfig, train, val, global_batch: int | None = None):
    """Batched (float32 images [0,255], one-hot labels) datasets; train is shuffled + augmented."""
    size, batch = input_size_of(cfg), int(global_batch or cfg.batch_size)
    num_classes = len(train.classes)
    augment = aug.build_augment(cfg.augment, size)

    def finish(x, y):
        return tf.cast(x, tf.float32), tf.one_hot(y, num_classes)

    train_ds = (_decoded(cfg, train, size).shuffle(len(train.paths), seed=cfg.seed, reshuffle_each_iteration=True)
                .map(lambda x, y: (augment(x), y), num_parallel_calls=tf.data.AUTOTUNE)
                .map(finish).batch(batch).prefetch(tf.data.AUTOTUNE))
    val_ds = _decoded(cfg, val, size).map(finish).batch(batch).prefetch(tf.data.AUTOTUNE)
    return train_ds, val_ds


def steps_per_epoch(cfg: TrainConfig, num_train: int, global_batch: int | None = None) -> int:
    steps = math.ceil(num_train / int(global_batch or cfg.batch_size))
    return min(steps, cfg.max_steps_per_epoch) if cfg.max_steps_per_epoch else steps


# ---------------------------------------------------------------- model + phases
def build_model(cfg: TrainConfig, num_classes: int):
    return registry.create_model(
        cfg.backbone, num_classes, weights=cfg.weights, input_size=cfg.input_size,
        dense_units=cfg.dense_units, dropout=cfg.dropout, grayscale=cfg.grayscale, equalize=cfg.equalize)


def set_trainable(model, cfg: TrainConfig, phase: str) -> int:
    """Freeze/unfreeze for a phase; returns the number of trainable backbone layers.

    head: backbone frozen (custom_cnn trains whole when finetune_layers == 0: nothing to reuse).
    finetune: top `finetune_layers` (or all) backbone layers train; BatchNorm stays frozen.
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
    n = len(layers) if (from_scratch or cfg.finetune_layers < 0) else min(cfg.finetune_layers, len(layers))
    for i, layer in enumerate(layers):
        layer.trainable = i >= len(layers) - n
        if cfg.freeze_bn and isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    return sum(1 for layer in layers if layer.trainable and layer.weights)


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
    optimizer = keras.optimizers.AdamW(learning_rate=phase_schedule(cfg, phase, steps),
                                       weight_decay=cfg.weight_decay)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing),
        metrics=[keras.metrics.CategoricalAccuracy(name=TOP1),
                 keras.metrics.TopKCategoricalAccuracy(k=3, name=TOP3)],
    )


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


def phase_callbacks(cfg: TrainConfig, phase: str, checkpoint_dir: str | None, history: dict,
                    initial_best: float | None = None) -> list:
    """Early stopping on val top-1 with best restore, per-epoch checkpoints + history JSON."""
    cbs: list = [BestRestore(cfg.early_stopping_patience, initial_best)]
    if checkpoint_dir:
        Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
        pattern = str(Path(checkpoint_dir) / f"{phase}-epoch{{epoch:02d}}.weights.h5")
        cbs.append(keras.callbacks.ModelCheckpoint(pattern, save_weights_only=True))
        cbs.append(HistoryWriter(Path(checkpoint_dir) / HISTORY_FILE, phase, history))
    return cbs


def run_phase(model, cfg: TrainConfig, phase: str, train_ds, val_ds, callbacks: Sequence = (),
              steps: int | None = None, verbose: int = 2) -> dict:
    """model.fit for one phase (model already compiled for it); returns its history dict."""
    epochs = cfg.head_epochs if phase == PHASE_HEAD else cfg.finetune_epochs
    if epochs <= 0:
        return {}
    fit = model.fit(train_ds, validation_data=val_ds, epochs=epochs, steps_per_epoch=steps,
                    callbacks=list(callbacks), verbose=verbose)
    return {k: [float(v) for v in vals] for k, vals in fit.history.items()}


# ---------------------------------------------------------------- cached-feature head (CPU speed-up)
def feature_extractor(model):
    """preprocessing -> backbone of `model` as its own model (shares the layers)."""
    inp = keras.Input(model.input_shape[1:], dtype="float32")
    x = inp
    for layer in model.layers[1:]:
        if layer.name == registry.HEAD_LAYER:
            break
        x = layer(x)
    return keras.Model(inp, x, name="features")


def cache_features(cfg: TrainConfig, extractor, folder, views: int) -> tuple[np.ndarray, np.ndarray]:
    """Frozen features of `views` augmented passes over `folder` (0 = one plain pass)."""
    size = input_size_of(cfg)
    ds = _decoded(cfg, folder, size).map(lambda x, y: tf.cast(x, tf.float32))
    if views > 0:
        augment = aug.build_augment(cfg.augment, size)
        ds = ds.repeat(views).map(augment, num_parallel_calls=tf.data.AUTOTUNE)
    t0 = time.time()
    feats = extractor.predict(ds.batch(64).prefetch(tf.data.AUTOTUNE), verbose=0)
    labels = np.tile(np.asarray(folder.labels, np.int64), max(views, 1))
    log.info("cached %d feature vectors in %.0f s (%.1f img/s)", len(feats), time.time() - t0,
             len(feats) / max(time.time() - t0, 1e-9))
    return feats.astype(np.float32), labels


def _feature_cache_key(cfg: TrainConfig, train, val) -> str:
    """Same data, backbone, weights, size, augmentation, views and seed -> same features."""
    import hashlib

    fields = {k: v for k, v in cfg.to_dict().items()
              if k in ("backbone", "weights", "input_size", "augment", "head_feature_views", "seed",
                       "grayscale", "equalize", "resize_policy")}
    blob = json.dumps([fields, list(train.paths), list(val.paths)], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cached_feature_arrays(model, cfg: TrainConfig, train, val, checkpoint_dir: str | None):
    """(x_tr, y_tr, x_va, y_va), computed once and kept as .npz (no pickle) in checkpoint_dir,
    so a rerun with other head settings skips the backbone passes."""
    path = Path(checkpoint_dir) / f"features-{_feature_cache_key(cfg, train, val)}.npz" if checkpoint_dir else None
    if path is not None and path.exists():
        with np.load(path, allow_pickle=False) as z:
            log.info("reusing cached features %s", path)
            return z["x_tr"], z["y_tr"], z["x_va"], z["y_va"]
    extractor = feature_extractor(model)
    x_tr, y_tr = cache_features(cfg, extractor, train, cfg.head_feature_views)
    x_va, y_va = cache_features(cfg, extractor, val, 0)
    if path is not None:
        np.savez(path, x_tr=x_tr.astype(np.float16), y_tr=y_tr, x_va=x_va.astype(np.float16), y_va=y_va)
    return x_tr, y_tr, x_va, y_va


def train_head_on_features(model, cfg: TrainConfig, train, val, checkpoint_dir: str | None,
                           history: dict, callbacks: Sequence = ()) -> dict:
    """Phase 1 on cached features: ~views x one forward pass instead of one per epoch."""
    x_tr, y_tr, x_va, y_va = cached_feature_arrays(model, cfg, train, val, checkpoint_dir)
    x_tr, x_va = x_tr.astype(np.float32), x_va.astype(np.float32)
    head = registry.head_of(model)
    n = len(train.classes)
    tr = (tf.data.Dataset.from_tensor_slices((x_tr, tf.one_hot(y_tr, n)))
          .shuffle(len(x_tr), seed=cfg.seed).batch(cfg.head_batch_size).prefetch(2))
    va = tf.data.Dataset.from_tensor_slices((x_va, tf.one_hot(y_va, n))).batch(256)
    compile_for_phase(head, cfg, PHASE_HEAD, math.ceil(len(x_tr) / cfg.head_batch_size))
    cbs = phase_callbacks(cfg, PHASE_HEAD, checkpoint_dir, history) + list(callbacks)
    return run_phase(head, cfg, PHASE_HEAD, tr, va, cbs)


# ---------------------------------------------------------------- evaluation
def predict_probs(model, ds) -> np.ndarray:
    return model.predict(ds.map(lambda x, y: x), verbose=0)


def metrics_from_probs(probs: np.ndarray, labels: np.ndarray, classes) -> dict:
    """{top1, top3, per_class, count} — the card's metrics, computed by core.evaluate."""
    from core.evaluate import classification_metrics

    m = classification_metrics(probs, labels, classes)
    return {k: m[k] for k in ("top1", "top3", "per_class", "count")}


def final_metrics(model, cfg: TrainConfig, val, val_ds) -> tuple[Any, dict, dict]:
    """Metrics of the trained model; with tta_flip, also of the flip-averaged graph, which is
    kept only if it measures better. Returns (model_to_export, metrics, extras)."""
    labels = np.asarray(val.labels)
    probs = predict_probs(model, val_ds)
    plain = metrics_from_probs(probs, labels, val.classes)
    extras: dict = {"top1_no_tta": plain["top1"], "top3_no_tta": plain["top3"]}
    if not cfg.tta_flip:
        return model, plain, extras
    flipped = predict_probs(model, val_ds.map(lambda x, y: (tf.reverse(x, axis=[2]), y)))
    tta = metrics_from_probs((probs + flipped) / 2.0, labels, val.classes)
    extras.update(top1_flip_tta=tta["top1"], top3_flip_tta=tta["top3"])
    if tta["top1"] > plain["top1"]:
        extras["flip_tta"] = True
        return registry.with_flip_tta(model), tta, extras
    extras["flip_tta"] = False
    return model, plain, extras


# ---------------------------------------------------------------- single-process driver
def split_data(cfg: TrainConfig, data):
    """A folder path or ImageFolder -> (train, val) seeded stratified split."""
    from core import datasets

    folder = datasets.discover(data) if isinstance(data, (str, os.PathLike)) else data
    folder = datasets.select_classes(folder, cfg.classes)
    return datasets.stratified_split(folder, val_fraction=cfg.val_fraction, seed=cfg.seed)


def train(cfg: TrainConfig, data, *, callbacks: Sequence = (), checkpoint_dir: str | None = None) -> TrainResult:
    """Both phases in this process, then final metrics on the validation split."""
    keras.utils.set_random_seed(cfg.seed)
    setup_precision(cfg)
    train_set, val_set = split_data(cfg, data)
    if checkpoint_dir:
        Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
        (Path(checkpoint_dir) / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=1))
    model = build_model(cfg, len(train_set.classes))
    train_ds, val_ds = build_datasets(cfg, train_set, val_set)
    steps = steps_per_epoch(cfg, len(train_set.paths))
    if cfg.max_steps_per_epoch:
        train_ds = train_ds.repeat()
    history: dict = {}
    timings: dict = {}
    for phase in PHASES:
        t0 = time.time()
        if phase == PHASE_FINETUNE and cfg.finetune_layers == 0:
            continue
        if phase == PHASE_HEAD and cfg.head_feature_views > 0 and cfg.weights is not None:
            history[phase] = train_head_on_features(model, cfg, train_set, val_set, checkpoint_dir, history, callbacks)
        else:
            compile_for_phase(model, cfg, phase, steps)
            best = max(history.get(PHASE_HEAD, {}).get(MONITOR, []), default=None)
            cbs = phase_callbacks(cfg, phase, checkpoint_dir, history, best) + list(callbacks)
            history[phase] = run_phase(model, cfg, phase, train_ds, val_ds, cbs, steps=steps)
        timings[f"{phase}_s"] = round(time.time() - t0, 1)
    export_model, metrics, extras = final_metrics(model, cfg, val_set, val_ds)
    extras["timings"] = timings
    if checkpoint_dir:
        (Path(checkpoint_dir) / HISTORY_FILE).write_text(json.dumps(history, indent=1))
    log.info("validation top-1 %.4f top-3 %.4f (%s)", metrics["top1"], metrics["top3"], extras)
    return TrainResult(export_model, list(train_set.classes), history, metrics, cfg, extras)
