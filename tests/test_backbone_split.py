"""Fine-tuning on cached prefix activations: the cut, the shared weights, the whole driver."""
from __future__ import annotations

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import tf_keras as keras

from core import registry
from core import feature_cache, train_model
from core import train as core_train
from core.backbone_split import find_cut, split_backbone
from core.config import PHASE_FINETUNE, PHASE_HEAD, TrainConfig, smoke
from core.errors import ConfigError
from tests.fixtures.images import make_synthetic_dataset

SIZE = 32
TOP_CONV = "block4_conv2"  # custom_cnn's last conv


@pytest.fixture(scope="module")
def mobilenet():
    return registry.create_model("mobilenet_v2", 3, weights=None, input_size=SIZE)


def test_cut_lies_between_blocks(mobilenet):
    backbone = registry.backbone_of(mobilenet)
    split = split_backbone(backbone, 39)  # the preset's "blocks 13-16 + Conv_1"
    assert split.cut_layer == "block_12_add" and split.top_layers == 39
    # 40 would start inside block 12's residual branch: the cut moves down to block 11's output
    assert backbone.layers[find_cut(backbone, 40) - 1].name == "block_11_add"
    with pytest.raises(ConfigError, match="finetune_layers"):
        find_cut(backbone, 0)


def test_prefix_then_suffix_equals_backbone_and_shares_weights(mobilenet):
    backbone = registry.backbone_of(mobilenet)
    split = split_backbone(backbone, 39)
    x = np.random.default_rng(0).uniform(-1, 1, (4, SIZE, SIZE, 3)).astype(np.float32)
    whole = backbone(x, training=False).numpy()
    parts = split.suffix(split.prefix(x, training=False), training=False).numpy()
    np.testing.assert_allclose(parts, whole, rtol=1e-5, atol=1e-5)
    conv = backbone.get_layer("Conv_1")
    assert any(w is conv.kernel for w in split.suffix.weights)  # the same variable, not a copy
    assert not any(w is conv.kernel for w in split.prefix.weights)


def test_array_batches_draw_one_view_per_item_per_epoch():
    items, views = 10, 3
    x = np.repeat(np.arange(views, dtype=np.float16), items)[:, None]  # row value = its view
    y = np.tile(np.arange(items), views)
    seq = feature_cache.ArrayBatches(x, y, 4, items, views=views, shuffle=True, seed=1)
    seen_views = set()
    for _ in range(3):
        labels = np.concatenate([seq[i][1].argmax(1) for i in range(len(seq))])
        assert sorted(labels) == list(range(items))  # every item exactly once per epoch
        seen_views |= {float(v) for i in range(len(seq)) for v in seq[i][0][:, 0]}
        seq.on_epoch_end()
    assert seen_views == {0.0, 1.0, 2.0}


class KernelRecorder(keras.callbacks.Callback):
    """The top conv kernel after each fine-tune epoch (before any best-epoch restore)."""

    def __init__(self):
        super().__init__()
        self.top: list[np.ndarray] = []

    def on_epoch_end(self, epoch, logs=None):
        names = [layer.name for layer in self.model.layers]
        if "backbone_suffix" in names:
            self.top.append(self.model.get_layer("backbone_suffix").get_layer(TOP_CONV).kernel.numpy().copy())


def test_cached_finetune_trains_the_exported_model(tmp_path, caplog):
    data = make_synthetic_dataset(tmp_path / "ds", num_classes=3, images_per_class=8, size=40)
    weights = tmp_path / "backbone.h5"  # a "pretrained" custom_cnn: the cached path needs weights
    registry.backbone_of(registry.create_model("custom_cnn", 3, weights=None, input_size=SIZE)).save_weights(
        str(weights))
    cfg = smoke().replace(weights=str(weights), head_feature_views=2, head_epochs=2, finetune_epochs=2,
                          finetune_layers=5, finetune_cached=True, freeze_bn=True, tta_flip=False,
                          early_stopping_patience=3)
    ckpt = tmp_path / "ckpt"
    kernels = KernelRecorder()
    result = core_train.train(cfg, str(data), checkpoint_dir=str(ckpt), callbacks=[kernels])
    assert set(result.history) == {PHASE_HEAD, PHASE_FINETUNE}
    assert len(result.history[PHASE_FINETUNE]["val_top1"]) == 2
    assert {"feature_cache_s", "head_s", "finetune_s", "final_metrics_s"} <= set(result.extras["timings"])
    cache = list(ckpt.glob("features-*.npz"))
    assert len(cache) == 1
    with np.load(cache[0], allow_pickle=False) as z:
        assert z["x_tr"].shape[1:] == (4, 4, 256) and z["x_tr"].dtype == np.float16  # block4_relu1 at 32 px
        assert len(z["x_tr"]) == 2 * (3 * 8 - len(z["y_va"]))  # 2 views of each training image
    saved = json.loads((ckpt / train_model.HISTORY_FILE).read_text())
    assert set(saved) == {PHASE_HEAD, PHASE_FINETUNE}
    # fine-tuning moved the top backbone layers (the model's own: see the shared-weights test)
    # and never the frozen bottom
    start = registry.backbone_of(registry.create_model("custom_cnn", 3, weights=str(weights), input_size=SIZE))
    assert len(kernels.top) == 2 and not np.allclose(start.get_layer(TOP_CONV).kernel.numpy(), kernels.top[0])
    trained = registry.backbone_of(result.model)
    first_conv = "block1_conv1"
    assert np.array_equal(start.get_layer(first_conv).kernel.numpy(), trained.get_layer(first_conv).kernel.numpy())
    # a rerun reuses the cache file instead of running the backbone again
    stamp = cache[0].stat().st_mtime_ns
    with caplog.at_level("INFO", logger="core.feature_cache"):
        core_train.train(cfg.replace(finetune_epochs=1), str(data), checkpoint_dir=str(ckpt))
    assert list(ckpt.glob("features-*.npz")) == cache and cache[0].stat().st_mtime_ns == stamp
    assert any("reusing cached features" in r.getMessage() for r in caplog.records)


def test_cached_finetune_applies_only_with_views_and_a_layer_count():
    base = smoke().replace(weights="imagenet", finetune_cached=True, head_feature_views=2, finetune_layers=5)
    assert feature_cache.uses_cached_finetune(base)
    assert not feature_cache.uses_cached_finetune(base.replace(head_feature_views=0))  # nothing cached: on the fly
    assert not feature_cache.uses_cached_finetune(base.replace(finetune_layers=-1))  # all layers: no prefix to cache
    assert not feature_cache.uses_cached_finetune(base.replace(weights=None))  # a random frozen prefix is no use


def test_the_feature_cache_follows_the_photos_and_survives_a_cut_file(tmp_path, caplog):
    """A photo replaced under the same name must not reuse the old photo's features; a cache file
    cut short (full disk, partial copy) is computed again, not a crash."""
    photo = tmp_path / "a.jpg"
    photo.write_bytes(b"old photo")
    folders = SimpleNamespace(paths=[str(photo)]), SimpleNamespace(paths=[])
    cfg = TrainConfig()
    key = feature_cache._feature_cache_key(cfg, *folders)
    assert feature_cache._feature_cache_key(cfg, *folders) == key
    photo.write_bytes(b"new photo")  # same name, same size
    os.utime(photo, ns=(1, 1))
    assert feature_cache._feature_cache_key(cfg, *folders) != key

    computed = []

    def compute():
        computed.append(1)
        return {"x": np.arange(3)}

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    assert feature_cache._cached_npz(str(ckpt), key, compute)["x"].tolist() == [0, 1, 2]
    cache = ckpt / f"features-{key}.npz"
    cache.write_bytes(cache.read_bytes()[:20])
    with caplog.at_level("WARNING", logger="core.feature_cache"):
        assert feature_cache._cached_npz(str(ckpt), key, compute)["x"].tolist() == [0, 1, 2]
    assert len(computed) == 2 and "cannot be read" in caplog.text
    assert feature_cache._cached_npz(str(ckpt), key, compute)["x"].tolist() == [0, 1, 2] and len(computed) == 2
