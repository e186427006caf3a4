"""Deterministic preprocessing as Keras layers, so it lives INSIDE the exported graph.

Contract (contracts.md): a breedlabel model takes float32 RGB in [0, 255]; whatever a
backbone expects (scaling, BGR mean subtraction, grayscale, equalisation) happens here,
so the bundle's uint8 signature needs nothing outside the graph.
"""
from __future__ import annotations


import tensorflow as tf
import tf_keras as keras

# Normalisation modes, named as keras.applications' imagenet_utils names them.
MODE_TF = "tf"  # [-1, 1]  (MobileNetV2, InceptionV3)
MODE_CAFFE = "caffe"  # RGB->BGR, minus ImageNet BGR mean (VGG16, ResNet50)
MODE_TORCH = "torch"  # [0,1] then ImageNet mean/std
MODE_UNIT = "unit"  # [0, 1]  (the custom CNN)
MODE_NONE = "none"  # the backbone normalises itself (EfficientNet, EfficientNetV2)
MODES = (MODE_TF, MODE_CAFFE, MODE_TORCH, MODE_UNIT, MODE_NONE)

_CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)


def normalize(images: tf.Tensor, mode: str) -> tf.Tensor:
    """Map float [0,255] RGB to what a backbone was trained on."""
    x = tf.cast(images, tf.float32)
    if mode == MODE_TF:
        return x / 127.5 - 1.0
    if mode == MODE_CAFFE:
        return x[..., ::-1] - tf.constant(_CAFFE_BGR_MEAN)
    if mode == MODE_TORCH:
        return (x / 255.0 - tf.constant(_TORCH_MEAN)) / tf.constant(_TORCH_STD)
    if mode == MODE_UNIT:
        return x / 255.0
    if mode == MODE_NONE:
        return x
    raise ValueError(f"unknown normalisation mode {mode!r}; valid: {', '.join(MODES)}")


def grayscale(images: tf.Tensor) -> tf.Tensor:
    """Luma replicated to 3 channels, so any RGB backbone accepts it."""
    gray = tf.image.rgb_to_grayscale(tf.cast(images, tf.float32))
    return tf.tile(gray, [1, 1, 1, 3])


def equalize(images: tf.Tensor) -> tf.Tensor:
    """Per-image, per-channel histogram equalisation of a [N,H,W,C] batch in [0,255]."""
    x = tf.cast(tf.clip_by_value(tf.round(tf.cast(images, tf.float32)), 0, 255), tf.int32)
    shape = tf.shape(x)
    n, h, w, c = shape[0], shape[1], shape[2], shape[3]
    flat = tf.reshape(tf.transpose(x, [0, 3, 1, 2]), [n * c, h * w])  # one row per channel
    hist = tf.math.bincount(flat, minlength=256, maxlength=256, axis=-1, dtype=tf.float32)
    cdf = tf.cumsum(hist, axis=-1)
    # cdf_min = first non-zero bin count (the darkest value present)
    cdf_min = tf.reduce_min(tf.where(cdf > 0, cdf, tf.fill(tf.shape(cdf), float("inf"))), axis=-1)
    total = tf.cast(h * w, tf.float32)
    denom = tf.maximum(total - cdf_min, 1.0)[:, None]
    lut = tf.clip_by_value(tf.round((cdf - cdf_min[:, None]) / denom * 255.0), 0, 255)
    # a single-valued channel (denominator 0) keeps its values
    flat_eq = tf.gather(lut, flat, batch_dims=1)
    constant = (total - cdf_min)[:, None] <= 0
    flat_eq = tf.where(constant, tf.cast(flat, tf.float32), flat_eq)
    return tf.transpose(tf.reshape(flat_eq, [n, c, h, w]), [0, 2, 3, 1])


class Normalize(keras.layers.Layer):
    """Backbone normalisation as a serialisable layer (no Lambda: configs stay portable)."""

    def __init__(self, mode: str = MODE_TF, **kwargs):
        super().__init__(**kwargs)
        if mode not in MODES:
            raise ValueError(f"unknown normalisation mode {mode!r}; valid: {', '.join(MODES)}")
        self.mode = mode

    def call(self, inputs):
        return normalize(inputs, self.mode)

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


class Grayscale(keras.layers.Layer):
    """RGB -> gray replicated to 3 channels."""

    def call(self, inputs):
        return grayscale(inputs)


class Equalize(keras.layers.Layer):
    """Histogram equalisation per image and channel; output stays in [0,255]."""

    def call(self, inputs):
        return equalize(inputs)


class FlipLeftRight(keras.layers.Layer):
    """Mirror a [N,H,W,C] batch; used for flip test-time averaging inside the graph."""

    def call(self, inputs):
        return tf.reverse(inputs, axis=[2])


CUSTOM_OBJECTS = {"Normalize": Normalize, "Grayscale": Grayscale, "Equalize": Equalize, "FlipLeftRight": FlipLeftRight}
