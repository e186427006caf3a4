"""Each augmentation op, eagerly and inside tf.data.map (big_vision's pp-op test pattern)."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from core import augment
from core.config import AugmentConfig

SIZE = 32

OPS = {
    "resize": lambda x: augment.resize(x, SIZE),
    "random_resized_crop": lambda x: augment.random_resized_crop(x, SIZE, (0.2, 1.0)),
    "zoom_out_then_crop": lambda x: augment.random_resized_crop(augment.random_zoom_out(x, 2.0, 1.0), SIZE),
    "random_flip": augment.random_flip,
    "random_rotation": lambda x: augment.random_rotation(x, 20.0),
    "random_zoom": lambda x: augment.random_zoom(x, (0.8, 1.2)),
    "random_translate": lambda x: augment.random_translate(x, 0.2),
    "random_contrast": lambda x: augment.random_contrast(x, 0.3),
    "color_jitter": lambda x: augment.color_jitter(x, 0.3, 0.3, 0.05),
    "build_augment": augment.build_augment(
        AugmentConfig(rotation_deg=10, zoom=(0.9, 1.1), translate=0.1, hue=0.02), SIZE),
}


def _image(h=40, w=48):
    return tf.constant(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _check(out, size=None):
    out = out.numpy()
    assert out.dtype == np.float32 and out.ndim == 3 and out.shape[-1] == 3
    if size:
        assert out.shape[:2] == (size, size)
    assert out.min() >= 0.0 and out.max() <= 255.0 + 1e-3
    assert np.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(OPS))
def test_op_eager(name):
    image = _image() if name in ("resize", "random_resized_crop", "zoom_out_then_crop", "build_augment") \
        else _image(SIZE, SIZE)
    out = OPS[name](image)
    _check(out, SIZE)


@pytest.mark.parametrize("name", sorted(OPS))
def test_op_in_dataset_map(name):
    images = [_image(), _image(50, 36)] if name in ("resize", "random_resized_crop", "zoom_out_then_crop",
                                                    "build_augment") else [_image(SIZE, SIZE)] * 2
    ds = tf.data.Dataset.from_generator(lambda: iter(images), output_signature=tf.TensorSpec([None, None, 3], tf.uint8))
    for out in ds.map(OPS[name]):
        _check(out, SIZE)


def test_zoom_out_grows_canvas_and_keeps_content():
    x = tf.fill([10, 10, 3], 200.0)
    out = augment.random_zoom_out(x, max_scale=3.0, prob=1.0)
    assert out.shape[0] >= 10 and out.shape[1] >= 10
    np.testing.assert_allclose(out.numpy(), 200.0)  # mean-colour fill of a flat image
    assert augment.random_zoom_out(x, 3.0, prob=0.0).shape == (10, 10, 3)


def test_rotation_zero_is_identity_and_flip_mirrors():
    x = tf.cast(_image(SIZE, SIZE), tf.float32)
    np.testing.assert_allclose(augment.random_rotation(x, 0.0).numpy(), x.numpy())
    np.testing.assert_allclose(augment.random_zoom(x, (1.0, 1.0)).numpy(), x.numpy(), atol=1e-3)
    flips = {bool(np.allclose(augment.random_flip(x).numpy(), x.numpy()[:, ::-1])) for _ in range(20)}
    assert flips == {True, False}
