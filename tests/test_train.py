"""Two-phase training end to end on a tiny synthetic folder dataset (seconds on 2 cores)."""
from __future__ import annotations

import json

import numpy as np
import tensorflow as tf
import pytest

from core import registry
from core import feature_cache, train_data, train_model, tta_select
from core import train as core_train
from core.config import PHASE_FINETUNE, PHASE_HEAD, smoke
from core.errors import ConfigError, InputError
from tests.fixtures.images import make_synthetic_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("data") / "ds", num_classes=3, images_per_class=10,
                                  size=40)


@pytest.mark.slow
def test_smoke_two_phases(dataset, tmp_path):
    cfg = smoke().replace(head_epochs=2, finetune_epochs=2, tta_flip=True)
    result = core_train.train(cfg, str(dataset), checkpoint_dir=str(tmp_path / "ckpt"))
    assert set(result.history) == {PHASE_HEAD, PHASE_FINETUNE}
    for phase in (PHASE_HEAD, PHASE_FINETUNE):
        assert {"loss", "top1", "top3", "val_top1", "val_top3"} <= set(result.history[phase])
    m = result.metrics
    assert len(m["per_class"]) == 3 and m["count"] == 6
    # the card's top-1 is what the exported model predicts on the validation split
    _, val = train_data.split_data(cfg, str(dataset))
    _, val_ds = train_data.build_datasets(cfg, *train_data.split_data(cfg, str(dataset)))
    out = tta_select.predict_probs(result.model, val_ds)
    probs = out["probs"]
    assert m["top1"] == pytest.approx(np.mean(probs.argmax(1) == np.asarray(val.labels)))
    assert out["dog_score"].shape == (len(val.labels),)
    assert m["top1"] <= m["top3"] <= 1.0
    assert "top1_flip_tta" in result.extras and "top1_no_tta" in result.extras
    saved = json.loads((tmp_path / "ckpt" / train_model.HISTORY_FILE).read_text())
    assert set(saved) == {PHASE_HEAD, PHASE_FINETUNE}
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("*.weights.h5")) == [
        "finetune-epoch01.weights.h5", "finetune-epoch02.weights.h5",
        "head-epoch01.weights.h5", "head-epoch02.weights.h5"]
    probs = result.model(np.zeros((1, 32, 32, 3), np.float32))["probs"].numpy()
    assert probs.shape == (1, 3)


def test_early_stopping_restores_best(dataset):
    """A LR so high it diverges after epoch 1: training stops and the best epoch's weights return."""
    cfg = smoke().replace(head_epochs=6, head_lr=5.0, finetune_layers=0, early_stopping_patience=1,
                          tta_flip=False)
    result = core_train.train(cfg, str(dataset))
    val = result.history[PHASE_HEAD]["val_top1"]
    assert len(val) < 6 or max(val) == val[-1]
    assert result.metrics["top1"] == pytest.approx(max(val), abs=1e-6)


def test_freezing_rules():
    cfg = smoke().replace(weights="imagenet", finetune_layers=5, freeze_bn=True)
    model = registry.create_model("custom_cnn", 3, weights=None, input_size=32)
    assert train_model.set_trainable(model, cfg, PHASE_HEAD) == 0
    assert not model.trainable_weights[:-2] or all("predictions" in w.name or "head" in w.name
                                                    for w in model.trainable_weights)
    train_model.set_trainable(model, cfg, PHASE_FINETUNE)
    trainable = [l.name for l in registry.backbone_of(model).layers if l.trainable and l.weights]
    assert trainable == ["block4_conv2"]  # top 5: conv, bn (frozen), relu, pool, gap
    bn = registry.backbone_of(model).get_layer("block4_bn2")
    assert not bn.trainable


def test_feature_cached_head(dataset):
    """Phase 1 on cached features of augmented views trains the shared head layers."""
    cfg = smoke().replace(weights="imagenet", head_feature_views=2, head_epochs=2, finetune_layers=0,
                          backbone="custom_cnn")
    train, val = train_data.split_data(cfg, str(dataset))
    model = registry.create_model("custom_cnn", 3, weights=None, input_size=32)
    before = registry.head_of(model).get_weights()[0].copy()
    run = train_model.TrainRun(cfg, train, val)
    feature_cache.train_head_on_features(model, run)
    assert len(run.history["head"]["val_top1"]) == 2
    assert not np.allclose(before, registry.head_of(model).get_weights()[0])
    x, y = feature_cache.cache_features(cfg, registry.feature_extractor(model), train, 2)
    assert x.shape == (2 * len(train.paths), 256) and len(y) == len(x)


def test_long_steps_report_counts_and_time_left(dataset, caplog):
    """Caching features and measuring the final metrics take minutes on real data: each reports
    its counts as it goes (a log line each tenth off a terminal) and its total at the end."""
    import logging

    caplog.set_level(logging.INFO, logger="core.console")
    cfg = smoke().replace(tta_flip=True)
    train, val = train_data.split_data(cfg, str(dataset))
    model = registry.create_model("custom_cnn", 3, weights=None, input_size=32)
    feature_cache.cached_feature_arrays(model, train_model.TrainRun(cfg, train, val))
    _, val_ds = train_data.build_datasets(cfg, train, val)
    tta_select.final_metrics(model, cfg, val, val_ds)
    lines = [r.getMessage() for r in caplog.records]
    assert any(m.startswith(f"backbone features, 1 view(s) of each training photo: {len(train)} img in ")
               for m in lines), lines
    assert any(m.startswith(f"backbone features of the validation photos: {len(val)} img in ") for m in lines)
    assert any(m.startswith(f"validation metrics (2 view(s) of each photo): {2 * len(val)} img in ") for m in lines)


def test_progress_lines_off_a_terminal(caplog):
    import logging

    from core.console import Progress

    caplog.set_level(logging.INFO, logger="core.console")
    with Progress(100, "caching") as progress:
        for _ in range(10):
            progress.update(10)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 10 and lines[0].startswith("caching: 10/100 img (") and "left)" in lines[0]
    assert lines[-1].startswith("caching: 100 img in ")


def test_warmup_cosine_schedule():
    s = train_model.WarmupCosine(1.0, total_steps=10, warmup_steps=2)
    values = [float(s(i)) for i in range(12)]
    assert values[0] == pytest.approx(0.5) and values[1] == pytest.approx(1.0)
    assert values[2] == pytest.approx(1.0) and values[10] == pytest.approx(0.0, abs=1e-6)
    assert all(a >= b for a, b in zip(values[2:], values[3:]))


def test_training_decodes_with_core_images(dataset):
    """Training reads photos through core.images (the serving decode), not a second decoder."""
    from core import images

    cfg = smoke()
    train, _ = train_data.split_data(cfg, str(dataset))
    path = train.paths[0]
    got = train_data.load_image(tf.constant(path), 32, cfg.resize_policy).numpy()
    with open(path, "rb") as f:
        want = images.decode_image(f.read(), size=(32, 32), policy=cfg.resize_policy).array
    np.testing.assert_array_equal(got, want)


def test_undecodable_training_photo_is_named(tmp_path):
    data = make_synthetic_dataset(tmp_path / "ds", num_classes=2, images_per_class=6, size=40)
    bad = sorted(data.iterdir())[0] / "broken.jpg"
    bad.write_text("not a photo")
    with pytest.raises(InputError, match=r"broken\.jpg: not an image; fix or remove"):
        core_train.train(smoke().replace(val_fraction=0.5), str(data))


def test_a_class_with_one_photo_is_named_before_training(tmp_path):
    data = make_synthetic_dataset(tmp_path / "ds", num_classes=3, images_per_class=1, size=40)
    with pytest.raises(ConfigError, match=r"3 class folder\(s\) hold fewer than 2 photos .*--classes"):
        train_data.split_data(smoke(), str(data))


def test_mirror_views_are_the_photo_then_its_mirror(dataset):
    cfg = smoke().replace(head_view_kind="mirror")
    train, _ = train_data.split_data(cfg, str(dataset))
    extractor = registry.feature_extractor(registry.create_model("custom_cnn", 3, weights=None, input_size=32))
    x, y = feature_cache.cache_features(cfg, extractor, train, 2)
    n = len(train.paths)
    assert x.shape == (2 * n, 256) and list(y[:n]) == list(y[n:]) == list(train.labels)
    photo = train_data.load_image(tf.constant(train.paths[1]), 32).numpy().astype(np.float32)[None]
    np.testing.assert_allclose(x[1], extractor(photo).numpy()[0], rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(x[n + 1], extractor(photo[:, :, ::-1]).numpy()[0], rtol=1e-2, atol=1e-2)
    assert not np.allclose(x[1], x[n + 1], atol=1e-3)


def test_size_views_are_the_views_resized_through_a_twin(dataset):
    """With tta_sizes the head also trains on each view resized as the exported graph resizes it."""
    cfg = smoke().replace(input_size=48, tta_sizes=(32,), head_view_kind="mirror", head_feature_views=2)
    train, val = train_data.split_data(cfg, str(dataset))
    model = registry.create_model("custom_cnn", 3, weights=None, input_size=48)
    x, y = feature_cache.cache_features(cfg, registry.feature_extractor(model), train, cfg.head_feature_views)
    xs, ys = feature_cache.with_size_views(model, train_model.TrainRun(cfg, train, val), x, y)
    n = len(train.paths)
    assert xs.shape == (4 * n, 256) and list(ys) == list(train.labels) * 4
    np.testing.assert_array_equal(xs[:2 * n], x)
    twin = registry.feature_extractor(train_model.model_at_size(model, cfg, 3, 32))
    photo = train_data.load_image(tf.constant(train.paths[1]), 48).numpy().astype(np.float32)[None]
    for row, view in ((2 * n + 1, photo), (3 * n + 1, photo[:, :, ::-1])):
        want = twin(train_data.resize_view(view, 32)).numpy()[0]
        np.testing.assert_allclose(xs[row], want, rtol=1e-2, atol=1e-2)
    assert not np.allclose(xs[1], xs[2 * n + 1], atol=1e-3)


def test_final_metrics_keeps_the_features_the_dog_score_reads(dataset):
    """One backbone pass per view gives both the probabilities and the pooled features the dog
    score's threshold is fitted on: they equal the exported graph's and registry.view_features'."""
    cfg = smoke().replace(input_size=48, tta_sizes=(32,), tta_flip=True)
    train, val = train_data.split_data(cfg, str(dataset))
    model = registry.create_model("custom_cnn", 3, weights=None, input_size=48)
    _, val_ds = train_data.build_datasets(cfg, train, val)
    x = np.concatenate([batch for batch, _ in val_ds.as_numpy_iterator()])
    chosen, _, _ = tta_select.final_metrics(model, cfg, val, val_ds)
    want = registry.view_features(model, flip=chosen.flip, resized=chosen.resized).predict(x, verbose=0)
    assert chosen.val_features.shape == (len(val), want.shape[1])
    np.testing.assert_allclose(chosen.val_features, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(chosen.val_probs, chosen.graph().predict(x, verbose=0), atol=1e-5)
    without, _, _ = tta_select.final_metrics(model, cfg.replace(dog_score=False), val, val_ds)
    assert without.val_features is None
    np.testing.assert_allclose(without.val_probs, chosen.val_probs, atol=1e-5)


def test_dog_score_gaussians_are_fitted_at_every_size_the_graph_scores(dataset):
    """The training photos' features at the input size, then resized through each exported
    twin as the graph resizes, with their labels repeated; without sizes, the photos alone."""
    cfg = smoke().replace(input_size=48, tta_sizes=(32,))
    train, _ = train_data.split_data(cfg, str(dataset))
    model = registry.create_model("custom_cnn", 3, weights=None, input_size=48)
    twin = train_model.model_at_size(model, cfg, 3, 32)
    chosen = tta_select.Chosen(model, False, [(32, twin)], np.zeros((0, 3)))
    x, y = core_train.dog_score_training_features(cfg, chosen, train)
    n = len(train.paths)
    assert x.shape == (2 * n, 256) and x.dtype == np.float32 and list(y) == list(train.labels) * 2
    photo = train_data.load_image(tf.constant(train.paths[1]), 48).numpy().astype(np.float32)[None]
    np.testing.assert_allclose(x[1], registry.feature_extractor(model)(photo).numpy()[0], rtol=1e-4, atol=1e-4)
    at_32 = registry.feature_extractor(twin)(train_data.resize_view(photo, 32)).numpy()[0]
    np.testing.assert_allclose(x[n + 1], at_32, rtol=1e-4, atol=1e-4)
    assert not np.allclose(x[1], x[n + 1], atol=1e-3)
    alone, labels = core_train.dog_score_training_features(cfg, tta_select.Chosen(model, True, [], None), train)
    np.testing.assert_array_equal(alone, x[:n])
    assert list(labels) == list(train.labels)


def test_final_metrics_weighs_every_tta_candidate_and_exports_the_best(dataset):
    cfg = smoke().replace(input_size=48, tta_sizes=(32,), tta_flip=True, finetune_layers=0, head_epochs=2)
    result = core_train.train(cfg, str(dataset))
    e = result.extras
    candidates = [e[f"top1_{name}"] for name in ("no_tta", "flip_tta", "sizes_tta", "flip_sizes_tta")]
    assert result.metrics["top1"] == max(candidates)
    layers = [layer.name for layer in result.model.layers]
    assert ("tta_resize_32" in layers) == (e["tta_sizes"] == [32])
    assert any(name.startswith("flip_tta") for name in layers) == e["flip_tta"]
    x = np.random.default_rng(0).uniform(0, 255, (2, 48, 48, 3)).astype(np.float32)
    out = result.model(x)
    assert out["probs"].numpy().shape == (2, 3) and out["dog_score"].numpy().shape == (2,)
