"""Training data: the seeded split, the serving decode inside tf.data, the batched pipelines.

Training reads photos with core.images, the decode + resize that `predict` and `label` use, so
the model trains on what serving computes; a photo it cannot read stops training with its name.
"""
from __future__ import annotations

import contextlib
import math
import os

import numpy as np
import tensorflow as tf

from core import augment as aug
from core import datasets, images, storage
from core.config import TrainConfig
from core.errors import ConfigError, InputError
from core.train_model import input_size_of


def split_data(cfg: TrainConfig, data):
    """A folder path or ImageFolder -> (train, val) seeded stratified split."""
    folder = datasets.discover(data) if isinstance(data, (str, os.PathLike)) else data
    folder = datasets.limit_per_class(datasets.select_classes(folder, cfg.classes), cfg.per_class)
    counts = np.bincount(folder.labels, minlength=len(folder.classes))
    scarce = [breed.folder for breed, n in zip(folder.classes, counts) if n < 2]
    if scarce:
        raise ConfigError(f"{len(scarce)} class folder(s) hold fewer than 2 photos ({', '.join(scarce[:5])}"
                          f"{', …' if len(scarce) > 5 else ''}): training needs one for training and one for "
                          "validation in each; add photos, or leave those classes out with --classes")
    return datasets.stratified_split(folder, val_fraction=cfg.val_fraction, seed=cfg.seed)


def resize_view(batch: tf.Tensor, size: int) -> tf.Tensor:
    """The photo(s) at `size` px by the op the exported graph runs (keras Resizing: bilinear, no
    antialias, which OpenVINO converts), so the head trains on what inference computes."""
    return tf.image.resize(batch, (size, size), method="bilinear")


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


def decoded(cfg: TrainConfig, folder, size: int) -> tf.data.Dataset:
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

    train_ds = (decoded(cfg, train, size).shuffle(len(train.paths), seed=cfg.seed, reshuffle_each_iteration=True)
                .map(lambda x, y: (augment(x), y), num_parallel_calls=tf.data.AUTOTUNE)
                .map(finish).batch(batch).prefetch(tf.data.AUTOTUNE))
    val_ds = decoded(cfg, val, size).map(finish).batch(batch).prefetch(tf.data.AUTOTUNE)
    return train_ds, val_ds


def steps_per_epoch(cfg: TrainConfig, num_train: int, global_batch: int | None = None) -> int:
    steps = math.ceil(num_train / int(global_batch or cfg.batch_size))
    return min(steps, cfg.max_steps_per_epoch) if cfg.max_steps_per_epoch else steps
