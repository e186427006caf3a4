"""Two-phase training: a head on the frozen backbone, then fine-tuning its top layers.

Built from small functions a distributed runner (Ray Train + MultiWorkerMirroredStrategy)
reuses instead of writing a second loop:

    train_ds, val_ds = build_datasets(cfg, train, val, global_batch)
    with strategy.scope():
        model = build_model(cfg, num_classes)
        compile_for_phase(model, cfg, PHASE_HEAD, steps_per_epoch)
    run_phase(model, cfg, PHASE_HEAD, train_ds, val_ds, callbacks=[report_callback])

`train(cfg, data)` is the single-process driver; it can also train the head on cached
features of augmented views (fast on CPU) before the on-the-fly fine-tune, or, with
`finetune_cached`, run both phases on one cache of the frozen prefix's activations
(core.backbone_split).
"""
from __future__ import annotations

import contextlib
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
from core import console  # noqa: E402
from core import registry  # noqa: E402
from core.config import PHASE_FINETUNE, PHASE_HEAD, PHASES, VIEWS_MIRROR, TrainConfig  # noqa: E402
from core.errors import ConfigError, InputError  # noqa: E402

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


def tta_sizes_of(cfg: TrainConfig) -> list[int]:
    """The other input sizes the model also sees each photo at (cfg.tta_sizes but the input size)."""
    return [s for s in cfg.tta_sizes if s != input_size_of(cfg)]


def resize_view(images: tf.Tensor, size: int) -> tf.Tensor:
    """The photo(s) at `size` px by the op the exported graph runs (keras Resizing: bilinear, no
    antialias, which OpenVINO converts), so the head trains on what inference computes."""
    return tf.image.resize(images, (size, size), method="bilinear")


# ---------------------------------------------------------------- data
@contextlib.contextmanager
def named_input_errors():
    """An undecodable or unreadable photo inside tf.data surfaces as a graph error whose text
    carries ours; give the user that one line (file + reason) and what to do."""
    try:
        yield
    except tf.errors.OpError as exc:
        for kind in ("ImageDecodeError", "StorageError"):
            marker = f"{kind}: "
            if marker in exc.message:
                line = exc.message.split(marker, 1)[1].splitlines()[0]
                raise InputError(f"training data: {line}; fix or remove that file and rerun") from None
        raise


def decode_file(path: str, size: int, policy: str = "resize_crop") -> np.ndarray:
    """The photo at `path` (local or URI) as uint8 [size, size, 3] through core.images, the same
    decode + resize that predict and label use, so training sees what serving will see."""
    from core import images, storage

    return images.decode_image(storage.read_bytes(path), size=(size, size), policy=policy, source=path).array


def load_image(path: tf.Tensor, size: int, policy: str = "resize_crop") -> tf.Tensor:
    """tf.data wrapper of decode_file; an undecodable photo stops training with its name."""
    @tf.autograph.experimental.do_not_convert
    def decode(p) -> np.ndarray:
        p = p.item() if isinstance(p, np.ndarray) else p  # a 0-d array when run eagerly
        return decode_file(p.decode() if isinstance(p, bytes) else str(p), size, policy)

    image = tf.numpy_function(decode, [path], tf.uint8, stateful=False)
    image.set_shape((size, size, 3))
    return image


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
def build_model(cfg: TrainConfig, num_classes: int, name_suffix: str = ""):
    return registry.create_model(
        cfg.backbone, num_classes, weights=cfg.weights, input_size=cfg.input_size,
        dense_units=cfg.dense_units, dropout=cfg.dropout, grayscale=cfg.grayscale, equalize=cfg.equalize,
        name_suffix=name_suffix)


def model_at_size(model, cfg: TrainConfig, num_classes: int, size: int):
    """A twin of `model` with the same weights whose input is `size` px: every backbone here is
    fully convolutional with global pooling, so one set of weights serves any size."""
    twin = build_model(cfg.replace(input_size=size, weights=None, tta_sizes=()), num_classes, f"_{size}px")
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


# ---------------------------------------------------------------- cached features (CPU speed-up)
def feature_extractor(model, backbone_part=None):
    """preprocessing -> backbone of `model` (or `backbone_part`, e.g. its frozen prefix) as
    its own model; the layers are shared, not copied."""
    inp = keras.Input(model.input_shape[1:], dtype="float32")
    x = inp
    for layer in model.layers[1:]:
        if layer.name == registry.HEAD_LAYER:
            break
        if backbone_part is not None and layer.name == registry.BACKBONE_LAYER:
            x = backbone_part(x)
            break
        x = layer(x)
    return keras.Model(inp, x, name="features")


def cache_features(cfg: TrainConfig, extractor, folder, views: int, view_size: int | None = None,
                   desc: str = "caching features") -> tuple[np.ndarray, np.ndarray]:
    """float16 outputs of `extractor` on `views` passes over `folder` (0 = one plain pass),
    view-major: row v * len(folder) + i is view v of image i. Views are augmented, or with
    head_view_kind "mirror" the photo (even v) and its mirror image (odd v): the distribution
    a flip-averaged bundle sees at inference. With `view_size`, each view is then resized to
    it (the extractor must take that size), as the exported graph does for cfg.tta_sizes.
    `desc` names the pass in its progress line."""
    size = input_size_of(cfg)
    ds = _decoded(cfg, folder, size).map(lambda x, y: tf.cast(x, tf.float32))
    if views > 0 and cfg.head_view_kind == VIEWS_MIRROR:
        n = len(folder.paths)
        ds = ds.repeat(views).enumerate().map(
            lambda i, x: tf.cond((i // n) % 2 == 1, lambda: tf.reverse(x, axis=[1]), lambda: x))
    elif views > 0:
        augment = aug.build_augment(cfg.augment, size)
        ds = ds.repeat(views).map(augment, num_parallel_calls=tf.data.AUTOTUNE)
    if view_size is not None and view_size != size:
        ds = ds.map(lambda x: resize_view(x, view_size))
    total = len(folder.paths) * max(views, 1)
    out = np.empty((total, *extractor.output_shape[1:]), np.float16)
    forward = tf.function(lambda batch: extractor(batch, training=False))
    done = 0
    with console.Progress(total, desc) as progress:
        for batch in ds.batch(64).prefetch(tf.data.AUTOTUNE):
            values = forward(batch).numpy()
            out[done:done + len(values)] = values
            done += len(values)
            progress.update(len(values))
    return out, np.tile(np.asarray(folder.labels, np.int64), max(views, 1))


def _feature_cache_key(cfg: TrainConfig, train, val, tag: str | None = None) -> str:
    """Same data, backbone, weights, size, augmentation, views, seed (and cut) -> same features."""
    import hashlib

    fields = {k: v for k, v in cfg.to_dict().items()
              if k in ("backbone", "weights", "input_size", "augment", "head_feature_views", "head_view_kind", "seed",
                       "grayscale", "equalize", "resize_policy")}
    parts = [fields, list(train.paths), list(val.paths), "decode:core.images"] + ([tag] if tag else [])
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _cached_npz(checkpoint_dir: str | None, key: str, compute) -> dict[str, np.ndarray]:
    """`compute()`'s arrays, kept as features-<key>.npz (no pickle) in checkpoint_dir, so a rerun
    with other head or fine-tune settings skips the backbone passes."""
    path = Path(checkpoint_dir) / f"features-{key}.npz" if checkpoint_dir else None
    if path is not None and path.exists():
        with np.load(path, allow_pickle=False) as z:
            log.info("reusing cached features %s", path)
            return {k: z[k] for k in z.files}
    arrays = compute()
    if path is not None:
        tmp = path.with_name(path.name + ".partial.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)
    return arrays


def cached_feature_arrays(model, cfg: TrainConfig, train, val, checkpoint_dir: str | None,
                          backbone_part=None, tag: str | None = None):
    """(x_tr, y_tr, x_va, y_va) float16 features (pooled, or `backbone_part`'s activations) of the
    training views and the plain validation photos, computed once (see _cached_npz)."""
    def compute() -> dict[str, np.ndarray]:
        extractor = feature_extractor(model, backbone_part)
        what = "backbone features" if backbone_part is None else "activations below the fine-tuned layers"
        x_tr, y_tr = cache_features(cfg, extractor, train, cfg.head_feature_views,
                                    desc=f"{what}, {max(cfg.head_feature_views, 1)} view(s) of each training photo")
        x_va, y_va = cache_features(cfg, extractor, val, 0, desc=f"{what} of the validation photos")
        return {"x_tr": x_tr, "y_tr": y_tr, "x_va": x_va, "y_va": y_va}

    z = _cached_npz(checkpoint_dir, _feature_cache_key(cfg, train, val, tag), compute)
    return z["x_tr"], z["y_tr"], z["x_va"], z["y_va"]


def with_size_views(model, cfg: TrainConfig, train, val, checkpoint_dir: str | None,
                    x_tr: np.ndarray, y_tr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pooled training features `x_tr` plus those of the same views at each of cfg.tta_sizes
    (through that size's twin), so the head learns every view the exported graph averages."""
    sizes = tta_sizes_of(cfg)
    if not sizes:
        return x_tr, y_tr
    xs, ys = [x_tr.astype(np.float16, copy=False)], [y_tr]
    for size in sizes:
        def compute(size: int = size) -> dict[str, np.ndarray]:
            twin = model_at_size(model, cfg, len(train.classes), size)
            x, y = cache_features(cfg, feature_extractor(twin), train, cfg.head_feature_views, view_size=size,
                                  desc=f"backbone features of the training views at {size} px")
            return {"x_tr": x, "y_tr": y}

        z = _cached_npz(checkpoint_dir, _feature_cache_key(cfg, train, val, f"size:{size}"), compute)
        xs.append(z["x_tr"])
        ys.append(z["y_tr"])
    return np.concatenate(xs), np.concatenate(ys)


class ArrayBatches(keras.utils.Sequence):
    """float32 batches from a float16 array without copying it into the graph.

    With `views` > 1 the rows are view-major (row v * n + i); each epoch shows every item
    once, in a randomly drawn view, so an epoch still means one pass over the images."""

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, num_classes: int, *, views: int = 1,
                 shuffle: bool = False, seed: int = 0, max_steps: int | None = None):
        super().__init__()
        self.x, self.y, self.batch_size, self.num_classes = x, y, int(batch_size), int(num_classes)
        self.views, self.shuffle, self.max_steps = max(int(views), 1), shuffle, max_steps
        self.items = len(x) // self.views
        self.rng = np.random.default_rng(seed)
        self.one_hot = np.eye(self.num_classes, dtype=np.float32)
        self.order = np.arange(self.items)
        self.on_epoch_end()

    def __len__(self) -> int:
        steps = math.ceil(self.items / self.batch_size)
        return min(steps, self.max_steps) if self.max_steps else steps

    def __getitem__(self, i: int):
        rows = self.order[i * self.batch_size:(i + 1) * self.batch_size]
        rows = np.sort(rows)  # sequential reads from the big array
        return self.x[rows].astype(np.float32), self.one_hot[self.y[rows]]

    def on_epoch_end(self) -> None:
        if not self.shuffle:
            self.order = np.arange(self.items)
            return
        view = self.rng.integers(0, self.views, self.items)
        self.order = self.rng.permutation(view * self.items + np.arange(self.items))


def fit_head_on_arrays(model, cfg: TrainConfig, arrays, num_classes: int, checkpoint_dir: str | None,
                       history: dict, callbacks: Sequence = ()) -> dict:
    """Phase 1 on cached pooled features (all views every epoch: they are cheap)."""
    x_tr, y_tr, x_va, y_va = arrays
    head = registry.head_of(model)
    tr = (tf.data.Dataset.from_tensor_slices((x_tr.astype(np.float32, copy=False), tf.one_hot(y_tr, num_classes)))
          .shuffle(len(x_tr), seed=cfg.seed).batch(cfg.head_batch_size).prefetch(2))
    va = (tf.data.Dataset.from_tensor_slices((x_va.astype(np.float32, copy=False), tf.one_hot(y_va, num_classes)))
          .batch(256))
    compile_for_phase(head, cfg, PHASE_HEAD, math.ceil(len(x_tr) / cfg.head_batch_size))
    cbs = phase_callbacks(cfg, PHASE_HEAD, checkpoint_dir, history) + list(callbacks)
    return run_phase(head, cfg, PHASE_HEAD, tr, va, cbs)


def train_head_on_features(model, cfg: TrainConfig, train, val, checkpoint_dir: str | None,
                           history: dict, callbacks: Sequence = ()) -> dict:
    """Phase 1 on cached features: ~views x one forward pass instead of one per epoch."""
    x_tr, y_tr, x_va, y_va = cached_feature_arrays(model, cfg, train, val, checkpoint_dir)
    x_tr, y_tr = with_size_views(model, cfg, train, val, checkpoint_dir, x_tr, y_tr)
    return fit_head_on_arrays(model, cfg, (x_tr, y_tr, x_va, y_va), len(train.classes), checkpoint_dir, history,
                              callbacks)


def uses_cached_finetune(cfg: TrainConfig) -> bool:
    return (cfg.finetune_cached and cfg.weights is not None and cfg.head_feature_views > 0
            and cfg.finetune_layers > 0 and cfg.finetune_epochs > 0)


def train_on_cached_activations(model, cfg: TrainConfig, train, val, checkpoint_dir: str | None,
                                history: dict, callbacks: Sequence = ()) -> dict:
    """Both phases from ONE cache of the frozen prefix's activations (cfg.head_feature_views
    views per image, of cfg.head_view_kind): the head on pooled features of those views (through the frozen
    suffix), then suffix + head fine-tuned on the same activations. Returns phase timings."""
    from core.backbone_split import split_backbone

    n = len(train.classes)
    split = split_backbone(registry.backbone_of(model), cfg.finetune_layers)
    log.info("fine-tuning the top %d backbone layers on cached activations of %s", split.top_layers, split.cut_layer)
    timings: dict = {}
    t0 = time.time()
    x_tr, y_tr, x_va, y_va = cached_feature_arrays(model, cfg, train, val, checkpoint_dir,
                                                   backbone_part=split.prefix, tag=f"cut:{split.cut_layer}")
    pooled = [predict_with_progress(split.suffix, ArrayBatches(x, y, 256, n), len(x), f"pooling the {name} activations")
              for x, y, name in ((x_tr, y_tr, "training"), (x_va, y_va, "validation"))]
    head_x, head_y = with_size_views(model, cfg, train, val, checkpoint_dir, pooled[0], y_tr)
    timings["feature_cache_s"] = round(time.time() - t0, 1)

    t0 = time.time()
    set_trainable(model, cfg, PHASE_HEAD)
    history[PHASE_HEAD] = fit_head_on_arrays(model, cfg, (head_x, head_y, pooled[1], y_va), n, checkpoint_dir,
                                             history, callbacks)
    timings[f"{PHASE_HEAD}_s"] = round(time.time() - t0, 1)

    t0 = time.time()
    set_trainable(model, cfg, PHASE_FINETUNE, top=split.top_layers)
    inp = keras.Input(split.suffix.input_shape[1:], name="cut_activations")
    top = keras.Model(inp, registry.head_of(model)(split.suffix(inp)), name="cached_top")
    views = cfg.head_feature_views
    tr = ArrayBatches(x_tr, y_tr, cfg.batch_size, n, views=views, shuffle=True, seed=cfg.seed,
                      max_steps=cfg.max_steps_per_epoch)
    va = ArrayBatches(x_va, y_va, 128, n)
    compile_for_phase(top, cfg, PHASE_FINETUNE, len(tr))
    best = max(history[PHASE_HEAD].get(MONITOR, []), default=None)
    cbs = phase_callbacks(cfg, PHASE_FINETUNE, checkpoint_dir, history, best) + list(callbacks)
    history[PHASE_FINETUNE] = run_phase(top, cfg, PHASE_FINETUNE, tr, va, cbs)
    timings[f"{PHASE_FINETUNE}_s"] = round(time.time() - t0, 1)
    return timings


# ---------------------------------------------------------------- evaluation
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


def predict_probs(model, ds, progress=None) -> np.ndarray:
    return predict_with_progress(model, ds.map(lambda x, y: x), 0, "predicting", progress)


def metrics_from_probs(probs: np.ndarray, labels: np.ndarray, classes) -> dict:
    """{top1, top3, per_class, count} — the card's metrics, computed by core.evaluate."""
    from core.evaluate import classification_metrics

    m = classification_metrics(probs, labels, classes)
    return {k: m[k] for k in ("top1", "top3", "per_class", "count")}


def _resized_batch(size: int):
    return lambda x, y: (resize_view(x, size), y)


def final_metrics(model, cfg: TrainConfig, val, val_ds) -> tuple[Any, dict, dict]:
    """Metrics of the trained model and of each test-time average the config allows (its mirror
    with tta_flip, its twins at tta_sizes, both); the one that measures best is exported, on a
    tie the first of: none, mirror, sizes, both. Returns (model_to_export, metrics, extras with every candidate's figures)."""
    labels, n = np.asarray(val.labels), len(val.classes)
    twins = {size: model_at_size(model, cfg, n, size) for size in tta_sizes_of(cfg)}
    probs: dict[tuple[int | None, bool], np.ndarray] = {}
    passes = (1 + len(twins)) * (2 if cfg.tta_flip else 1)
    with console.Progress(len(labels) * passes, f"validation metrics ({passes} view(s) of each photo)") as progress:
        for size, net in [(None, model), *twins.items()]:
            ds = val_ds if size is None else val_ds.map(_resized_batch(size))
            probs[(size, False)] = predict_probs(net, ds, progress)
            if cfg.tta_flip:
                probs[(size, True)] = predict_probs(net, ds.map(lambda x, y: (tf.reverse(x, axis=[2]), y)), progress)
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
        m = metrics_from_probs(np.mean([probs[v] for v in views], axis=0), labels, val.classes)
        extras.update({f"top1_{name}": m["top1"], f"top3_{name}": m["top3"]})
        if best is None or m["top1"] > best[0]["top1"]:
            best = (m, flip, with_sizes)
    metrics, flip, with_sizes = best
    extras.update(flip_tta=flip, tta_sizes=list(with_sizes))
    return registry.with_tta(model, flip=flip, resized=[(s, twins[s]) for s in with_sizes]), metrics, extras


# ---------------------------------------------------------------- single-process driver
def split_data(cfg: TrainConfig, data):
    """A folder path or ImageFolder -> (train, val) seeded stratified split."""
    from core import datasets

    folder = datasets.discover(data) if isinstance(data, (str, os.PathLike)) else data
    folder = datasets.limit_per_class(datasets.select_classes(folder, cfg.classes), cfg.per_class)
    return datasets.stratified_split(folder, val_fraction=cfg.val_fraction, seed=cfg.seed)


def train_phases(model, cfg: TrainConfig, train_set, val_set, train_ds, val_ds, checkpoint_dir: str | None,
                 history: dict, callbacks: Sequence = ()) -> dict:
    """Head then fine-tune, each epoch decoding + augmenting on the fly (the head may use cached
    pooled features); returns phase timings."""
    steps = steps_per_epoch(cfg, len(train_set.paths))
    if cfg.max_steps_per_epoch:
        train_ds = train_ds.repeat()
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
    return timings


def train(cfg: TrainConfig, data, *, callbacks: Sequence = (), checkpoint_dir: str | None = None) -> TrainResult:
    """Both phases in this process, then final metrics on the validation split (always through
    the full exported graph on decoded validation images, whichever way training ran)."""
    keras.utils.set_random_seed(cfg.seed)
    setup_precision(cfg)
    train_set, val_set = split_data(cfg, data)
    if checkpoint_dir:
        Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
        (Path(checkpoint_dir) / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=1))
    model = build_model(cfg, len(train_set.classes))
    train_ds, val_ds = build_datasets(cfg, train_set, val_set)
    history: dict = {}
    with named_input_errors():
        if uses_cached_finetune(cfg):
            timings = train_on_cached_activations(model, cfg, train_set, val_set, checkpoint_dir, history, callbacks)
        else:
            timings = train_phases(model, cfg, train_set, val_set, train_ds, val_ds, checkpoint_dir, history,
                                   callbacks)
        t0 = time.time()
        export_model, metrics, extras = final_metrics(model, cfg, val_set, val_ds)
    timings["final_metrics_s"] = round(time.time() - t0, 1)
    extras["timings"] = timings
    if checkpoint_dir:
        (Path(checkpoint_dir) / HISTORY_FILE).write_text(json.dumps(history, indent=1))
    log.info("validation top-1 %.4f top-3 %.4f (%s)", metrics["top1"], metrics["top3"], extras)
    return TrainResult(export_model, list(train_set.classes), history, metrics, cfg, extras)
