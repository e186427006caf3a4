"""Training on cached backbone outputs: the CPU's way to train in minutes instead of hours.

One backbone pass over a few views of every photo (augmented, or the photo and its mirror)
caches pooled features, or the activations below the fine-tuned layers (core.backbone_split);
the head, then the top layers, train on those arrays. Caches are `.npz` files (no pickle) in
the checkpoint dir, keyed by everything that changes them, so a rerun with other head or
fine-tune settings skips the backbone pass.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import tensorflow as tf
import tf_keras as keras

from core import augment as aug
from core import console, registry
from core.registry import feature_extractor
from core.backbone_split import split_backbone
from core.config import HEAD_INIT_IMAGENET, PHASE_FINETUNE, PHASE_HEAD, VIEWS_MIRROR, TrainConfig
from core.head_init import warm_start_head
from core.train_data import decoded, resize_view
from core.train_model import (TrainRun, compile_for_phase, input_size_of, model_at_size, phase_callbacks,
                              predict_with_progress, run_phase, set_trainable, tta_sizes_of)

log = logging.getLogger(__name__)


def cache_features(cfg: TrainConfig, extractor, folder, views: int, view_size: int | None = None,
                   desc: str = "caching features", dtype=np.float16) -> tuple[np.ndarray, np.ndarray]:
    """Outputs of `extractor` (float16 unless `dtype` says) on `views` passes over `folder` (0 = one plain pass),
    view-major: row v * len(folder) + i is view v of image i. Views are augmented, or with
    head_view_kind "mirror" the photo (even v) and its mirror image (odd v): the distribution
    a flip-averaged bundle sees at inference. With `view_size`, each view is then resized to
    it (the extractor must take that size), as the exported graph does for cfg.tta_sizes.
    `desc` names the pass in its progress line."""
    size = input_size_of(cfg)
    ds = decoded(cfg, folder, size).map(lambda x, y: tf.cast(x, tf.float32))
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
    out = np.empty((total, *extractor.output_shape[1:]), dtype)
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
    fields = {k: v for k, v in cfg.to_dict().items()
              if k in ("backbone", "weights", "input_size", "augment", "head_feature_views", "head_view_kind", "seed",
                       "grayscale", "equalize", "resize_policy")}
    parts = [fields, _file_versions(train.paths), _file_versions(val.paths), "decode:core.images"]
    parts += [tag] if tag else []
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _file_versions(paths) -> list[tuple[str, int, int]]:
    """Path, size and mtime of each photo: a photo replaced under the same name changes the key."""
    return [(p, (st := os.stat(p)).st_size, st.st_mtime_ns) for p in paths]


def _cached_npz(checkpoint_dir: str | None, key: str, compute) -> dict[str, np.ndarray]:
    """`compute()`'s arrays, kept as features-<key>.npz (no pickle) in checkpoint_dir, so a rerun
    with other head or fine-tune settings skips the backbone passes."""
    path = Path(checkpoint_dir) / f"features-{key}.npz" if checkpoint_dir else None
    if path is not None and path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            log.info("reusing cached features %s", path)
            return arrays
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # cut short by a full disk or a copy
            log.warning("cached features %s cannot be read (%s); computing them again", path, e)
    arrays = compute()
    if path is not None:
        tmp = path.with_name(path.name + ".partial.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)
    return arrays


def cached_feature_arrays(model, run: TrainRun, backbone_part=None, tag: str | None = None):
    """(x_tr, y_tr, x_va, y_va) float16 features (pooled, or `backbone_part`'s activations) of the
    training views and the plain validation photos, computed once (see _cached_npz)."""
    cfg, train, val = run.cfg, run.train, run.val

    def compute() -> dict[str, np.ndarray]:
        extractor = feature_extractor(model, backbone_part)
        what = "backbone features" if backbone_part is None else "activations below the fine-tuned layers"
        x_tr, y_tr = cache_features(cfg, extractor, train, cfg.head_feature_views,
                                    desc=f"{what}, {max(cfg.head_feature_views, 1)} view(s) of each training photo")
        x_va, y_va = cache_features(cfg, extractor, val, 0, desc=f"{what} of the validation photos")
        return {"x_tr": x_tr, "y_tr": y_tr, "x_va": x_va, "y_va": y_va}

    z = _cached_npz(run.checkpoint_dir, _feature_cache_key(cfg, train, val, tag), compute)
    return z["x_tr"], z["y_tr"], z["x_va"], z["y_va"]


def with_size_views(model, run: TrainRun, x_tr: np.ndarray, y_tr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pooled training features `x_tr` plus those of the same views at each of cfg.tta_sizes
    (through that size's twin), so the head learns every view the exported graph averages."""
    cfg, train, val = run.cfg, run.train, run.val
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

        z = _cached_npz(run.checkpoint_dir, _feature_cache_key(cfg, train, val, f"size:{size}"), compute)
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


def fit_head_on_arrays(model, run: TrainRun, arrays) -> None:
    """Phase 1 on cached pooled features (all views every epoch: they are cheap)."""
    cfg, num_classes = run.cfg, run.num_classes
    x_tr, y_tr, x_va, y_va = arrays
    if cfg.head_init == HEAD_INIT_IMAGENET:
        run.card["head_init"] = warm_start_head(model, cfg.backbone, cfg.weights, x_tr, y_tr, run.train.classes)
    head = registry.head_of(model)
    tr = (tf.data.Dataset.from_tensor_slices((x_tr.astype(np.float32, copy=False), tf.one_hot(y_tr, num_classes)))
          .shuffle(len(x_tr), seed=cfg.seed).batch(cfg.head_batch_size).prefetch(2))
    va = (tf.data.Dataset.from_tensor_slices((x_va.astype(np.float32, copy=False), tf.one_hot(y_va, num_classes)))
          .batch(256))
    compile_for_phase(head, cfg, PHASE_HEAD, math.ceil(len(x_tr) / cfg.head_batch_size))
    run.history[PHASE_HEAD] = run_phase(head, cfg, PHASE_HEAD, tr, va, phase_callbacks(run, PHASE_HEAD))


def train_head_on_features(model, run: TrainRun) -> None:
    """Phase 1 on cached features: ~views x one forward pass instead of one per epoch."""
    x_tr, y_tr, x_va, y_va = cached_feature_arrays(model, run)
    x_tr, y_tr = with_size_views(model, run, x_tr, y_tr)
    fit_head_on_arrays(model, run, (x_tr, y_tr, x_va, y_va))


def uses_cached_finetune(cfg: TrainConfig) -> bool:
    return (cfg.finetune_cached and cfg.weights is not None and cfg.head_feature_views > 0
            and cfg.finetune_layers > 0 and cfg.finetune_epochs > 0)


def train_on_cached_activations(model, run: TrainRun) -> None:
    """Both phases from ONE cache of the frozen prefix's activations (cfg.head_feature_views
    views per image, of cfg.head_view_kind): the head on pooled features of those views (through the frozen
    suffix), then suffix + head fine-tuned on the same activations. Phase timings go to run.timings."""
    cfg, n = run.cfg, run.num_classes
    split = split_backbone(registry.backbone_of(model), cfg.finetune_layers)
    log.info("fine-tuning the top %d backbone layers on cached activations of %s", split.top_layers, split.cut_layer)
    t0 = time.time()
    x_tr, y_tr, x_va, y_va = cached_feature_arrays(model, run, backbone_part=split.prefix, tag=f"cut:{split.cut_layer}")
    pooled = [predict_with_progress(split.suffix, ArrayBatches(x, y, 256, n), len(x), f"pooling the {name} activations")
              for x, y, name in ((x_tr, y_tr, "training"), (x_va, y_va, "validation"))]
    head_x, head_y = with_size_views(model, run, pooled[0], y_tr)
    run.timings["feature_cache_s"] = round(time.time() - t0, 1)

    t0 = time.time()
    set_trainable(model, cfg, PHASE_HEAD)
    fit_head_on_arrays(model, run, (head_x, head_y, pooled[1], y_va))
    run.timings[f"{PHASE_HEAD}_s"] = round(time.time() - t0, 1)

    t0 = time.time()
    set_trainable(model, cfg, PHASE_FINETUNE, top=split.top_layers)
    inp = keras.Input(split.suffix.input_shape[1:], name="cut_activations")
    top = keras.Model(inp, registry.head_of(model)(split.suffix(inp)), name="cached_top")
    views = cfg.head_feature_views
    tr = ArrayBatches(x_tr, y_tr, cfg.batch_size, n, views=views, shuffle=True, seed=cfg.seed,
                      max_steps=cfg.max_steps_per_epoch)
    va = ArrayBatches(x_va, y_va, 128, n)
    compile_for_phase(top, cfg, PHASE_FINETUNE, len(tr))
    cbs = phase_callbacks(run, PHASE_FINETUNE, run.best(PHASE_HEAD))
    run.history[PHASE_FINETUNE] = run_phase(top, cfg, PHASE_FINETUNE, tr, va, cbs)
    run.timings[f"{PHASE_FINETUNE}_s"] = round(time.time() - t0, 1)
