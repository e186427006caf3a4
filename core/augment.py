"""Training-only augmentation: small pure TF ops on ONE image [H,W,3] float32 in [0,255].

Each op works eagerly and inside `tf.data.Dataset.map` (big_vision pp/ops_image style) and
returns float32 [0,255]. `build_augment(cfg, size)` composes them from an AugmentConfig.
Why these: the training crops are tight on the dog while user photos are whole scenes,
so scale jitter and zoom-out (DESIGN.md "Full scenes, not only crops") matter most.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Sequence

import tensorflow as tf

if TYPE_CHECKING:
    from core.config import AugmentConfig

Op = Callable[[tf.Tensor], tf.Tensor]


def _f32(image: tf.Tensor) -> tf.Tensor:
    return tf.cast(image, tf.float32)


def _uniform(low: float, high: float) -> tf.Tensor:
    return tf.random.uniform([], low, high, dtype=tf.float32)


def resize(image: tf.Tensor, size: int) -> tf.Tensor:
    """Plain resize to size x size (antialiased when shrinking)."""
    return tf.image.resize(_f32(image), (size, size), antialias=True)


def random_resized_crop(image: tf.Tensor, size: int, scale: Sequence[float] = (0.25, 1.0),
                        ratio: Sequence[float] = (3 / 4, 4 / 3)) -> tf.Tensor:
    """Inception-style crop: a random area fraction in `scale`, aspect in `ratio`, resized."""
    begin, crop_size, _ = tf.image.sample_distorted_bounding_box(
        tf.shape(image), tf.zeros([1, 0, 4], tf.float32), min_object_covered=0.0,
        aspect_ratio_range=tuple(ratio), area_range=tuple(scale), max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    return resize(tf.slice(_f32(image), begin, crop_size), size)


def random_zoom_out(image: tf.Tensor, max_scale: float = 2.0, prob: float = 0.5) -> tf.Tensor:
    """With probability `prob`, paste the image at a random place on a canvas up to
    `max_scale` times larger, filled with the image's mean colour (subject shrinks in frame)."""
    image = _f32(image)

    def zoom_out() -> tf.Tensor:
        h, w = tf.shape(image)[0], tf.shape(image)[1]
        s = _uniform(1.0, max_scale)
        ch = tf.cast(tf.cast(h, tf.float32) * s, tf.int32)
        cw = tf.cast(tf.cast(w, tf.float32) * s, tf.int32)
        top = tf.random.uniform([], 0, ch - h + 1, dtype=tf.int32)
        left = tf.random.uniform([], 0, cw - w + 1, dtype=tf.int32)
        mean = tf.reduce_mean(image, axis=[0, 1])
        padded = tf.image.pad_to_bounding_box(image - mean, top, left, ch, cw)
        return padded + mean

    if prob <= 0 or max_scale <= 1.0:
        return image
    return tf.cond(_uniform(0.0, 1.0) < prob, zoom_out, lambda: image)


def random_flip(image: tf.Tensor) -> tf.Tensor:
    return tf.image.random_flip_left_right(_f32(image))


def _transform(image: tf.Tensor, transform: tf.Tensor) -> tf.Tensor:
    """Apply a projective transform (output->input coordinates), reflecting at the borders."""
    shape = tf.shape(image)[:2]
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None], transforms=tf.reshape(transform, [1, 8]), output_shape=shape,
        fill_value=0.0, interpolation="BILINEAR", fill_mode="REFLECT")
    return out[0]


def random_rotation(image: tf.Tensor, max_degrees: float = 15.0) -> tf.Tensor:
    """Rotate about the centre by an angle in [-max_degrees, max_degrees]."""
    image = _f32(image)
    if max_degrees <= 0:
        return image
    theta = _uniform(-max_degrees, max_degrees) * (math.pi / 180.0)
    h = tf.cast(tf.shape(image)[0], tf.float32) - 1.0
    w = tf.cast(tf.shape(image)[1], tf.float32) - 1.0
    cos, sin = tf.cos(theta), tf.sin(theta)
    x_off = (w - (cos * w - sin * h)) / 2.0
    y_off = (h - (sin * w + cos * h)) / 2.0
    return _transform(image, tf.stack([cos, -sin, x_off, sin, cos, y_off, 0.0, 0.0]))


def random_zoom(image: tf.Tensor, zoom: Sequence[float] = (0.9, 1.1)) -> tf.Tensor:
    """Zoom about the centre by a factor in `zoom` (>1 = closer), same output size."""
    image = _f32(image)
    z = _uniform(zoom[0], zoom[1])
    cy = (tf.cast(tf.shape(image)[0], tf.float32) - 1.0) / 2.0
    cx = (tf.cast(tf.shape(image)[1], tf.float32) - 1.0) / 2.0
    inv = 1.0 / z
    return _transform(image, tf.stack([inv, 0.0, cx * (1 - inv), 0.0, inv, cy * (1 - inv), 0.0, 0.0]))


def random_translate(image: tf.Tensor, fraction: float = 0.1) -> tf.Tensor:
    """Shift by up to `fraction` of the height/width in each direction."""
    image = _f32(image)
    if fraction <= 0:
        return image
    dy = _uniform(-fraction, fraction) * tf.cast(tf.shape(image)[0], tf.float32)
    dx = _uniform(-fraction, fraction) * tf.cast(tf.shape(image)[1], tf.float32)
    return _transform(image, tf.stack([1.0, 0.0, -dx, 0.0, 1.0, -dy, 0.0, 0.0]))


def random_contrast(image: tf.Tensor, strength: float = 0.2) -> tf.Tensor:
    """Scale deviations from the mean by a factor in [1-strength, 1+strength]."""
    if strength <= 0:
        return _f32(image)
    out = tf.image.random_contrast(_f32(image), 1.0 - strength, 1.0 + strength)
    return tf.clip_by_value(out, 0.0, 255.0)


def color_jitter(image: tf.Tensor, brightness: float = 0.2, saturation: float = 0.2, hue: float = 0.02) -> tf.Tensor:
    """Brightness (fraction of full scale), saturation and hue jitter; clipped to [0,255]."""
    x = _f32(image) / 255.0
    if brightness > 0:
        x = tf.image.random_brightness(x, brightness)
    if saturation > 0:
        x = tf.image.random_saturation(tf.clip_by_value(x, 0.0, 1.0), 1.0 - saturation, 1.0 + saturation)
    if hue > 0:
        x = tf.image.random_hue(tf.clip_by_value(x, 0.0, 1.0), hue)
    return tf.clip_by_value(x, 0.0, 1.0) * 255.0


def compose(ops: Sequence[Op]) -> Op:
    def apply(image: tf.Tensor) -> tf.Tensor:
        for op in ops:
            image = op(image)
        return image

    return apply


def build_augment(cfg: "AugmentConfig", size: int) -> Op:
    """The training augmentation list from a config; every op is skipped when disabled."""
    ops: list[Op] = []
    if cfg.zoom_out_prob > 0:
        ops.append(lambda x: random_zoom_out(x, cfg.zoom_out_max, cfg.zoom_out_prob))
    if cfg.crop_scale_min < 1.0:
        ops.append(lambda x: random_resized_crop(x, size, (cfg.crop_scale_min, 1.0), cfg.crop_ratio))
    else:
        ops.append(lambda x: resize(x, size))
    if cfg.flip:
        ops.append(random_flip)
    if cfg.rotation_deg > 0:
        ops.append(lambda x: random_rotation(x, cfg.rotation_deg))
    if cfg.zoom != (1.0, 1.0):
        ops.append(lambda x: random_zoom(x, cfg.zoom))
    if cfg.translate > 0:
        ops.append(lambda x: random_translate(x, cfg.translate))
    if cfg.contrast > 0:
        ops.append(lambda x: random_contrast(x, cfg.contrast))
    if cfg.brightness > 0 or cfg.saturation > 0 or cfg.hue > 0:
        ops.append(lambda x: color_jitter(x, cfg.brightness, cfg.saturation, cfg.hue))
    ops.append(lambda x: tf.ensure_shape(tf.clip_by_value(x, 0.0, 255.0), (size, size, 3)))
    return compose(ops)
