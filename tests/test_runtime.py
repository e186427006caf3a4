"""Runtimes: OpenVINO agrees with TensorFlow (top-1, max |Δprob| ≤ 0.02), explicit names,
the auto choice and its TensorFlow fallback; plus the same parity on real photos with the real
MobileNetV2 weights (the `real_bundle` fixture: BREEDLABEL_TEST_BUNDLE, or one built from
../shared/weights)."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from core.bundle import load_bundle
from core.errors import ConfigError, InputError
from core.runtime import load_runtime

MAX_DPROB = 0.02
MAX_DDOG = 0.01  # |Δdog_score|: measured 3.3e-6 on the real-weights bundle (see test_parity_on_real_photos)
MIN_AGREEMENT = 0.995


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    return load_bundle(str(tiny_bundle))


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BREEDLABEL_CACHE", str(tmp_path / "cache"))


def _images(n, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _assert_parity(p_ov: np.ndarray, p_tf: np.ndarray, min_agreement: float = 1.0) -> None:
    assert p_ov.dtype == np.float32 and p_ov.shape == p_tf.shape
    assert float(np.abs(p_ov - p_tf).max()) <= MAX_DPROB
    assert float(np.mean(p_ov.argmax(1) == p_tf.argmax(1))) >= min_agreement


@pytest.fixture(scope="module")
def tf_runtime(bundle):
    rt = load_runtime(bundle, "tensorflow")
    assert rt.name == "tensorflow" and rt.input_size == (32, 32)
    return rt


@pytest.mark.parametrize("options", [{"mode": "sync"}, {"mode": "async", "threads": 1}])
@pytest.mark.slow
def test_openvino_matches_tensorflow(bundle, tf_runtime, options):
    x = _images(33)
    ov_rt = load_runtime(bundle, "openvino", **options)
    assert ov_rt.name == "openvino" and ov_rt.input_size == (32, 32)
    _assert_parity(ov_rt.predict(x), tf_runtime.predict(x))
    assert ov_rt.predict(x[:1]).shape == (1, 4)
    assert ov_rt.predict(x[:0]).shape == (0, 4)


@pytest.mark.slow
def test_openvino_runs_a_size_and_flip_averaged_graph(tmp_path):
    """registry.with_tta's bilinear resize and mirrors convert to OpenVINO and agree with TensorFlow."""
    import tf_keras as keras

    from core import registry
    from core.bundle import export_bundle
    from tests.fixtures.models import build_tiny_model, tiny_classes

    model = build_tiny_model(4, 48)
    small = build_tiny_model(4, 32)  # same seeded weights: fully convolutional, global pooling
    twin = keras.Model(small.inputs, small.outputs, name="tiny_cnn_32px")
    graph = registry.with_tta(model, flip=True, resized=[(32, twin)])
    tta_bundle = export_bundle(graph, tiny_classes(4), str(tmp_path / "tta"), input_size=48)
    rng = np.random.default_rng(3)  # a colour per image, so the images fall in different classes
    x = np.clip(rng.integers(0, 256, (17, 1, 1, 3)) + rng.integers(-20, 21, (17, 48, 48, 3)), 0, 255).astype(np.uint8)
    p_tf = load_runtime(tta_bundle, "tensorflow").predict(x)
    assert len(set(p_tf.argmax(1))) > 1
    _assert_parity(load_runtime(tta_bundle, "openvino").predict(x), p_tf)


@pytest.mark.slow
def test_converted_model_cache_is_used(bundle, tmp_path):
    first = load_runtime(bundle, "openvino")
    assert (tmp_path / "cache" / "openvino" / bundle.model_id / "model.xml").is_file()
    second = load_runtime(bundle, "openvino")
    x = _images(4)
    np.testing.assert_allclose(first.predict(x), second.predict(x), atol=1e-6)


@pytest.mark.slow
def test_auto_is_openvino_on_cpu(bundle, monkeypatch):
    monkeypatch.setattr("core.runtime.gpu_visible", lambda: False)
    assert load_runtime(bundle, "auto").name == "openvino"


def test_auto_falls_back_to_tensorflow_with_one_log_line(bundle, monkeypatch, caplog):
    def broken(_bundle):
        raise RuntimeError("unsupported op")

    monkeypatch.setattr("core.runtime.gpu_visible", lambda: False)
    monkeypatch.setattr("core.runtime._convert_openvino", broken)
    with caplog.at_level(logging.WARNING, logger="core.runtime"):
        rt = load_runtime(bundle, "auto")
    assert rt.name == "tensorflow"
    lines = [r for r in caplog.records if r.name == "core.runtime"]
    assert len(lines) == 1 and "falling back to TensorFlow" in lines[0].getMessage()


def test_explicit_openvino_failure_is_an_error(bundle, monkeypatch):
    from core.errors import BundleError

    monkeypatch.setattr("core.runtime._convert_openvino", lambda _b: (_ for _ in ()).throw(RuntimeError("x")))
    with pytest.raises(BundleError, match="--runtime tensorflow"):
        load_runtime(bundle, "openvino")


@pytest.mark.slow
def test_bad_names_and_inputs(bundle):
    with pytest.raises(ConfigError, match="runtime 'onnx'"):
        load_runtime(bundle, "onnx")
    with pytest.raises(ConfigError, match="mode"):
        load_runtime(bundle, "openvino", mode="fast")
    with pytest.raises(ConfigError, match="precision 'fp8'"):
        load_runtime(bundle, "openvino", precision="fp8")
    rt = load_runtime(bundle, "openvino")
    assert rt.precision == "f32"  # not bf16, even where the CPU has it: parity first
    with pytest.raises(InputError, match="uint8"):
        rt.predict(np.zeros((2, 32, 32, 3), np.float32))
    with pytest.raises(InputError, match=r"\[N,32,32,3\]"):
        rt.predict(np.zeros((2, 16, 16, 3), np.uint8))


@pytest.mark.shared_data
@pytest.mark.slow
def test_parity_on_real_photos(real_bundle, sample_bucket_dir, stanford_dogs_dir):
    """Real weights on real photos: ≥ 99.5 % top-1 agreement, max |Δprob| ≤ 0.02."""
    from core.predict import Predictor

    path = str(real_bundle)

    photos = sorted(str(p) for p in sample_bucket_dir.rglob("*") if p.is_file())
    photos += sorted(str(p) for p in stanford_dogs_dir.rglob("*.jpg"))[::50]  # 360 photos: 1 may disagree
    ov = Predictor(path, runtime="openvino")
    tf_rt = load_runtime(ov.bundle, "tensorflow")
    results = ov.predict_paths(photos, k=1, with_probs=True)
    kept = [r for r in results if r.ok]
    assert len(kept) >= 0.95 * len(photos)
    from core.images import decode_image

    arrays = np.stack([decode_image(open(r.source, "rb").read(), size=ov.size, policy=ov.policy).array
                       for r in kept])
    tf_out = [tf_rt.infer(arrays[i:i + 64]) for i in range(0, len(arrays), 64)]
    p_tf = np.concatenate([o.probs for o in tf_out])
    _assert_parity(np.stack([r.probs for r in kept]), p_tf, MIN_AGREEMENT)
    if ov.bundle.dog_threshold is not None:  # the built bundle has one; a given one may predate it
        dog_ov = np.array([r.dog_score for r in kept])
        dog_tf = np.concatenate([o.dog_score for o in tf_out])
        delta = float(np.abs(dog_ov - dog_tf).max())
        print(f"dog_score parity: max |Δ| {delta:.2e} over {len(kept)} photos")
        assert delta <= MAX_DDOG
        assert np.mean((dog_ov >= ov.bundle.dog_threshold) == (dog_tf >= ov.bundle.dog_threshold)) >= MIN_AGREEMENT
