"""Every registered backbone builds with weights=None at a small size and runs forward."""
from __future__ import annotations

import numpy as np
import pytest

from core import registry
from core.errors import ConfigError

# Large builds (hundreds of layers) take long on 2 cores; one of each family still runs.
SLOW = {f"efficientnet_b{i}" for i in range(1, 8)} | {f"efficientnet_v2_{k}" for k in ("b1", "b2", "b3", "s", "m", "l")}


def _params():
    for name in registry.list_models():
        marks = [pytest.mark.slow] if name in SLOW else []
        yield pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("name", list(_params()))
@pytest.mark.slow
def test_build_and_forward(name):
    spec = registry.get_spec(name)
    size = max(32, spec.min_input_size)
    model = registry.create_model(name, 3, weights=None, input_size=size, dense_units=8)
    assert model.input_shape == (None, size, size, 3)
    images = np.random.default_rng(0).uniform(0, 255, (2, size, size, 3)).astype("float32")
    probs = model(images, training=False).numpy()
    assert probs.shape == (2, 3) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-4)
    assert registry.backbone_of(model).output_shape[-1] == spec.feature_dim


def test_every_family_has_a_fast_member():
    families = {registry.get_spec(n).family for n in registry.list_models()}
    fast = {registry.get_spec(n).family for n in registry.list_models() if n not in SLOW}
    assert families == fast


def test_list_models_pattern():
    assert "mobilenet_v2" in registry.list_models()
    assert registry.list_models("efficientnet_b*") == [f"efficientnet_b{i}" for i in range(8)]
    assert registry.get_spec("inception_v3").input_size == 299
    assert registry.get_spec("efficientnet_b4").input_size == 380


def test_unknown_name_lists_valid_names():
    with pytest.raises(ConfigError, match="mobilenet_v2"):
        registry.create_model("mobilenet_v9", 3, weights=None)


def test_duplicate_registration_is_an_error():
    spec = registry.get_spec("custom_cnn")
    with pytest.raises(ConfigError, match="already registered"):
        registry.register_backbone(spec)


def test_bad_weights_and_sizes(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        registry.create_model("mobilenet_v2", 3, weights="/nonexistent/w.h5", input_size=32)
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"\xff\xd8\xff\xe0 not weights")
    with pytest.raises(ConfigError, match="photo.jpg' is not an HDF5"):
        registry.create_model("mobilenet_v2", 3, weights=str(photo), input_size=32)
    with pytest.raises(ConfigError, match="no ImageNet weights"):
        registry.create_model("custom_cnn", 3, weights="imagenet", input_size=32)
    with pytest.raises(ConfigError, match=">= 75"):
        registry.create_model("inception_v3", 3, weights=None, input_size=64)


def test_preprocessing_inside_and_flip_tta():
    model = registry.create_model("custom_cnn", 4, weights=None, input_size=32, grayscale=True, equalize=True)
    names = [layer.name for layer in model.layers]
    assert names[1:4] == ["equalize", "grayscale", "normalize"]
    tta = registry.with_tta(model, flip=True)
    x = np.random.default_rng(1).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    expected = (model(x).numpy() + model(x[:, :, ::-1]).numpy()) / 2
    np.testing.assert_allclose(tta(x).numpy(), expected, atol=1e-5)
    assert registry.with_tta(model) is model


def test_size_tta_averages_twins_on_resized_images():
    """One graph: the image through the model, and resized (bilinear) through a twin of another size."""
    import tensorflow as tf

    model = registry.create_model("custom_cnn", 3, weights=None, input_size=40)
    twin = registry.create_model("custom_cnn", 3, weights=None, input_size=32, name_suffix="_32px")
    twin.set_weights(model.get_weights())
    tta = registry.with_tta(model, flip=True, resized=[(32, twin)])
    x = np.random.default_rng(2).uniform(0, 255, (2, 40, 40, 3)).astype("float32")
    small = tf.image.resize(x, (32, 32), method="bilinear").numpy()
    views = [model(x), model(x[:, :, ::-1]), twin(small), twin(small[:, :, ::-1])]
    np.testing.assert_allclose(tta(x).numpy(), np.mean([v.numpy() for v in views], axis=0), atol=1e-5)
    assert not np.allclose(views[0].numpy(), views[2].numpy(), atol=1e-4)  # the sizes are different views


def test_dog_score_reads_the_features_averaged_over_the_same_views():
    """The served graph's dog score is the fit's score of the mean pooled features of every view it
    averages (no second backbone pass), and view_features is that mean: the threshold is fitted on it."""
    import tensorflow as tf

    from core.dog_score import dog_score_layer, fit_dog_score

    model = registry.create_model("custom_cnn", 3, weights=None, input_size=40)
    twin = registry.create_model("custom_cnn", 3, weights=None, input_size=32, name_suffix="_32px")
    twin.set_weights(model.get_weights())
    rng = np.random.default_rng(3)
    # each photo its own colour ramp plus noise: six noise photos gave an untrained CNN nearly the same
    # features, a near-singular fit whose float32 distances missed the bound in about 1 init of 4
    ramp = np.linspace(0, 1, 40, dtype="float32")[None, None, :, None]
    x = np.clip(rng.uniform(0, 255, (6, 1, 1, 3)) * ramp * 2 + rng.normal(0, 20, (6, 40, 40, 3)), 0, 255)
    x = x.astype("float32")
    small = tf.image.resize(x, (32, 32), method="bilinear").numpy()
    features, features_small = registry.feature_extractor(model), registry.feature_extractor(twin)
    views = [features(x), features(x[:, :, ::-1]), features_small(small), features_small(small[:, :, ::-1])]
    mean = np.mean([v.numpy() for v in views], axis=0)
    fit = fit_dog_score(mean, np.arange(6) % 3, mean, num_classes=3)
    graph = registry.with_tta(model, flip=True, resized=[(32, twin)], dog_score=dog_score_layer(fit))
    np.testing.assert_allclose(graph(x)["dog_score"].numpy(), fit.score(mean), atol=1e-4)
    np.testing.assert_allclose(registry.view_features(model, flip=True, resized=[(32, twin)])(x).numpy(), mean,
                               rtol=1e-4, atol=1e-5)
    assert not np.allclose(views[0].numpy(), mean, atol=1e-4)  # the views do differ


@pytest.mark.shared_data
def test_shared_mobilenet_weights_load(mobilenet_weights):
    model = registry.create_model("mobilenet_v2", 5, weights=str(mobilenet_weights), input_size=224)
    kernel = registry.backbone_of(model).get_layer("Conv1").get_weights()[0]
    fresh = registry.create_model("mobilenet_v2", 5, weights=None, input_size=224)
    assert not np.allclose(kernel, registry.backbone_of(fresh).get_layer("Conv1").get_weights()[0])
    x = np.full((1, 224, 224, 3), 128.0, np.float32)
    assert np.isfinite(model(x).numpy()).all()
