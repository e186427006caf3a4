"""In-model preprocessing layers match keras.applications' own preprocess_input."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from core import preprocess

X = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype(np.float32)


@pytest.mark.parametrize("mode,module", [("tf", "mobilenet_v2"), ("caffe", "vgg16"), ("caffe", "resnet"),
                                         ("tf", "inception_v3")])
def test_normalize_matches_keras(mode, module):
    import importlib

    ref = importlib.import_module(f"tf_keras.applications.{module}").preprocess_input(X.copy())
    np.testing.assert_allclose(preprocess.Normalize(mode)(X).numpy(), ref, rtol=1e-5, atol=1e-4)


def test_normalize_other_modes_and_unknown():
    np.testing.assert_allclose(preprocess.Normalize("unit")(X).numpy(), X / 255, rtol=1e-6)
    np.testing.assert_allclose(preprocess.Normalize("none")(X).numpy(), X)
    assert preprocess.Normalize("torch")(X).numpy().shape == X.shape
    with pytest.raises(ValueError, match="unknown"):
        preprocess.Normalize("bogus")


def test_grayscale_replicates_luma():
    out = preprocess.Grayscale()(X).numpy()
    assert out.shape == X.shape
    np.testing.assert_allclose(out[..., 0], out[..., 2])


def test_equalize_spreads_histogram_and_handles_flat():
    low = np.random.default_rng(1).integers(100, 120, (1, 16, 16, 3)).astype(np.float32)
    out = preprocess.Equalize()(low).numpy()
    assert out.min() == 0.0 and out.max() == 255.0
    flat = np.full((1, 4, 4, 3), 77.0, np.float32)
    np.testing.assert_allclose(preprocess.Equalize()(flat).numpy(), flat)
    # graph mode (as inside a SavedModel)
    fn = tf.function(lambda t: preprocess.equalize(t), input_signature=[tf.TensorSpec([None, None, None, 3])])
    np.testing.assert_allclose(fn(low).numpy(), out)


def test_layers_serialise():
    inp = keras.Input((8, 8, 3))
    out = preprocess.Normalize("caffe")(preprocess.Grayscale()(preprocess.Equalize()(inp)))
    model = keras.Model(inp, out)
    clone = keras.Model.from_config(model.get_config(), custom_objects=preprocess.CUSTOM_OBJECTS)
    np.testing.assert_allclose(clone(X).numpy(), model(X).numpy(), atol=1e-4)
