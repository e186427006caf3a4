"""The not-a-dog score and calibrated probabilities: fitted from the training photos alone,
inside the exported graph, the same on every runtime; a bundle without them still labels."""
from __future__ import annotations

import json

import numpy as np
import pytest

from core import calibration
from core.dog_score import KEEP, THRESHOLD, fit_dog_score


def _auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a positive > score of a negative) (Mann-Whitney)."""
    return float(np.mean(pos[:, None] > neg[None, :]) + 0.5 * np.mean(pos[:, None] == neg[None, :]))


def _clusters(rng, n_per, centres, spread=0.3):
    x = np.concatenate([c + spread * rng.standard_normal((n_per, centres.shape[1])) for c in centres])
    return x, np.repeat(np.arange(len(centres)), n_per)


def test_score_separates_in_from_out_of_distribution_and_keeps_the_stated_share():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((5, 32)) * 3
    train_x, train_y = _clusters(rng, 80, centres)
    val_x, _ = _clusters(rng, 40, centres)
    fit = fit_dog_score(train_x, train_y, val_x, num_classes=5)
    outside = rng.standard_normal((200, 32)) * 3  # not near any class
    inside, _ = _clusters(rng, 40, centres)
    assert _auroc(fit.score(inside), fit.score(outside)) > 0.99
    # the threshold rule: the card's threshold keeps KEEP of the validation photos
    assert np.mean(fit.score(val_x) >= THRESHOLD) == pytest.approx(KEEP, abs=1 / len(val_x) + 1e-9)
    assert np.median(fit.score(val_x)) == pytest.approx(0.9, abs=0.01)
    assert fit.card["threshold"] == THRESHOLD and "97.5%" in fit.card["threshold_rule"]


def test_score_is_the_nearest_breed_distance_relative_to_the_background():
    """raw = -(min over breeds of the Mahalanobis distance - the distance to one Gaussian of all the
    training photos), both covariances shrunk: checked against a direct computation."""
    from core.dog_score import SHRINKAGE, l2_normalise

    rng = np.random.default_rng(6)
    centres = rng.standard_normal((4, 12)) * 2
    x, y = _clusters(rng, 30, centres)
    fit = fit_dog_score(x, y, x[::2], num_classes=4)
    z = l2_normalise(x)

    def precision(centred):
        cov = centred.T @ centred / len(centred)
        return np.linalg.inv((1 - SHRINKAGE) * cov + SHRINKAGE * np.trace(cov) / 12 * np.eye(12))

    means = np.stack([z[y == c].mean(0) for c in range(4)])
    p_class, p_all = precision(z - means[y]), precision(z - z.mean(0))
    probe = l2_normalise(rng.standard_normal((7, 12)))
    nearest = np.min([np.einsum("nd,de,ne->n", probe - m, p_class, probe - m) for m in means], axis=0)
    background = np.einsum("nd,de,ne->n", probe - z.mean(0), p_all, probe - z.mean(0))
    np.testing.assert_allclose(fit.raw(probe), -(nearest - background), rtol=1e-4, atol=1e-6)
    assert fit.card["method"] == "relative-mahalanobis++"


def test_score_layer_computes_what_the_fit_says():
    from core.dog_score import dog_score_layer

    rng = np.random.default_rng(1)
    centres = rng.standard_normal((3, 16)) * 2
    x, y = _clusters(rng, 30, centres)
    fit = fit_dog_score(x, y, x[::3], num_classes=3)
    probe = rng.standard_normal((10, 16)).astype(np.float32)
    got = dog_score_layer(fit)(probe).numpy()
    np.testing.assert_allclose(got, fit.score(probe), atol=1e-4)


def test_score_layer_stays_exact_in_float32_when_the_classes_are_tight():
    """Tight classes make the precision matrix large: the expanded distance z'Pz - 2z'P mu + mu'P mu
    then cancels in float32; the layer's whitened differences must not."""
    from core.dog_score import dog_score_layer

    rng = np.random.default_rng(5)
    centres = rng.standard_normal((4, 24)) * 2
    x, y = _clusters(rng, 10, centres, spread=1e-3)
    fit = fit_dog_score(x, y, _clusters(rng, 3, centres, spread=1e-3)[0], num_classes=4)
    probe = np.concatenate([_clusters(rng, 3, centres, spread=1e-3)[0], rng.standard_normal((4, 24))])
    np.testing.assert_allclose(dog_score_layer(fit)(probe.astype(np.float32)).numpy(), fit.score(probe), atol=2e-3)


def test_temperature_recovers_overconfidence_and_lowers_the_ece():
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((4000, 10)) * 2
    truth = np.array([rng.choice(10, p=np.exp(r) / np.exp(r).sum()) for r in logits])
    overconfident = np.exp(3 * logits) / np.exp(3 * logits).sum(axis=1, keepdims=True)
    t = calibration.fit_temperature(truth, overconfident)
    assert t == pytest.approx(3.0, rel=0.1)
    report = calibration.calibrate(truth, overconfident)
    assert report["ece_after"] < report["ece_before"] and report["ece_after_crossfit"] < report["ece_before"]
    scaled = calibration.apply_temperature(overconfident, t)
    assert np.array_equal(scaled.argmax(1), overconfident.argmax(1))  # rankings never change


def test_a_temperature_fitted_on_too_few_photos_is_warned_about(caplog):
    """Six photos, every one wrong and sure: the NLL keeps falling as T grows, T ends at its bound
    and means nothing; training says so instead of exporting it silently."""
    probs = np.full((6, 3), 0.2)
    probs[np.arange(6), np.arange(6) % 3] = 0.6
    with caplog.at_level("WARNING", logger="core.calibration"):
        report = calibration.calibrate((np.arange(6) + 1) % 3, probs)
    assert report["temperature"] == pytest.approx(np.exp(4.0), rel=1e-2)
    assert "6 validation photos are too few to fit a temperature" in caplog.text and "at its bound" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="core.calibration"):
        rng = np.random.default_rng(2)
        logits = rng.standard_normal((2000, 10)) * 2
        truth = np.array([rng.choice(10, p=np.exp(r) / np.exp(r).sum()) for r in logits])
        calibration.calibrate(truth, np.exp(2 * logits) / np.exp(2 * logits).sum(axis=1, keepdims=True))
    assert caplog.text == ""


@pytest.fixture(scope="module")
def trained_bundles(tmp_path_factory):
    """One tiny trained bundle with the dog score and temperature, one without (as older bundles)."""
    from core import train as core_train
    from core.config import smoke
    from core.datasets import discover
    from tests.fixtures.images import make_synthetic_dataset

    root = tmp_path_factory.mktemp("dog")
    data = make_synthetic_dataset(root / "ds", num_classes=3, images_per_class=10, size=40)
    cfg = smoke().replace(head_epochs=2, finetune_layers=0)
    with_score = core_train.train(cfg, str(data))
    core_train.export_trained(with_score, str(root / "with"), discover(str(data)))
    without = core_train.train(cfg.replace(dog_score=False, calibrate=False), str(data))
    core_train.export_trained(without, str(root / "without"), discover(str(data)))
    return root / "with", root / "without", data


def test_bundle_card_and_both_runtimes_agree_on_the_score(trained_bundles):
    from core.bundle import load_bundle
    from core.runtime import load_runtime

    path, _, _ = trained_bundles
    bundle = load_bundle(str(path))
    card = json.loads((path / "card.json").read_text())
    assert card["dog_score"]["method"] == "relative-mahalanobis++" and bundle.dog_threshold == THRESHOLD
    assert card["calibration"]["temperature"] > 0 and "ece_before" in card["calibration"]
    images = np.random.default_rng(3).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    ov = load_runtime(bundle, "openvino").infer(images)
    tf_out = load_runtime(bundle, "tensorflow").infer(images)
    assert ov.dog_score.shape == (16,) and tf_out.dog_score.shape == (16,)
    assert np.abs(ov.dog_score - tf_out.dog_score).max() <= 1e-3
    assert np.abs(ov.probs - tf_out.probs).max() <= 0.02


def test_labelling_fills_the_dog_columns_and_an_old_bundle_leaves_them_null(trained_bundles, tmp_path):
    import pyarrow as pa

    from core.bundle import load_bundle
    from core.labelling import BatchLabeller

    with_path, without_path, data = trained_bundles
    photos = sorted(str(p) for p in data.rglob("*.jpg"))[:6]
    chunk = pa.table({"uri": photos, "member": [None] * len(photos), "data": [None] * len(photos),
                      "error": [None] * len(photos)})
    rows = BatchLabeller(load_bundle(str(with_path)), runtime="openvino").label(chunk)
    scores, flags = rows.column("dog_score").to_pylist(), rows.column("is_dog").to_pylist()
    assert all(s is not None for s in scores) and all((s >= THRESHOLD) == f for s, f in zip(scores, flags))
    breeds, top_k = rows.column("breed").to_pylist(), rows.column("top_k").to_pylist()
    assert all((b is None) == (not f) and len(t) == 3 for b, f, t in zip(breeds, flags, top_k))  # non-dogs: no breed
    strict = BatchLabeller(load_bundle(str(with_path)), runtime="openvino", dog_threshold=1.0).label(chunk)
    assert strict.column("is_dog").to_pylist() == [s >= 1.0 for s in scores]
    assert strict.column("breed").null_count == sum(s < 1.0 for s in scores)
    old = BatchLabeller(load_bundle(str(without_path)), runtime="openvino").label(chunk)
    assert old.column("dog_score").null_count == len(photos) and old.column("is_dog").null_count == len(photos)
    assert old.column("breed").null_count == 0


def test_a_label_run_records_the_threshold_its_rows_are_flagged_with(trained_bundles, ray_local, tmp_path):
    """The manifest's config holds the threshold in force (the card's when none is given), and
    `review` orders each run's rows by it: a run at `--dog-threshold 0.7` was reviewed as at 0.5."""
    import subprocess
    import sys

    from core import output
    from core.label_config import LabelConfig
    from jobs.label import label

    bundle, _, data = trained_bundles
    small = dict(inputs=(str(data),), model=str(bundle), actors=1, cpus_per_actor=1, batch_size=8, progress=False)
    card = label(LabelConfig(**small, out=str(tmp_path / "card")))
    assert card[output.M_CONFIG]["dog_threshold"] == THRESHOLD
    strict = label(LabelConfig(**small, out=str(tmp_path / "strict"), dog_threshold=0.7))
    assert strict[output.M_CONFIG]["dog_threshold"] == 0.7
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "review", str(tmp_path / "strict"), "--to",
                           str(tmp_path / "r.json")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for task in json.loads((tmp_path / "r.json").read_text()):
        score, uncertainty = task["data"]["dog_score"], task["data"]["uncertainty"]
        assert task["data"]["is_dog"] == (score >= 0.7)
        assert uncertainty >= 1 - abs(score - 0.7) / (0.3 if score >= 0.7 else 0.7) - 1e-5


def test_with_non_dog_photos_the_score_is_a_logistic_regression_on_them():
    from core.dog_score import dog_score_layer, fit_dog_vs_not

    rng = np.random.default_rng(4)
    dogs = rng.standard_normal((300, 16)) + 2.0
    others = rng.standard_normal((300, 16)) - 2.0
    fit = fit_dog_vs_not(dogs[:200], others[:200], dogs[200:250])
    assert fit.card["method"] == "logistic"
    assert _auroc(fit.score(dogs[250:]), fit.score(others[200:])) > 0.99
    np.testing.assert_allclose(dog_score_layer(fit)(others[:8].astype(np.float32)).numpy(), fit.score(others[:8]),
                               atol=1e-4)


def test_not_dogs_needs_the_dog_score():
    from core.config import smoke
    from core.errors import ConfigError

    with pytest.raises(ConfigError, match="--not-dogs needs the dog score"):
        smoke().replace(not_dogs="somewhere", dog_score=False)


def test_train_with_not_dogs_exports_the_logistic_score(tmp_path):
    from core import train as core_train
    from core.bundle import load_bundle
    from core.config import smoke
    from core.datasets import discover
    from core.runtime import load_runtime
    from PIL import Image

    from tests.fixtures.images import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "ds", num_classes=3, images_per_class=8, size=40)
    others = tmp_path / "not_dogs" / "things"
    others.mkdir(parents=True)
    for i in range(6):
        noise = np.random.default_rng(100 + i).integers(0, 256, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(noise).save(others / f"{i}.jpg")
    cfg = smoke().replace(head_epochs=1, finetune_layers=0, not_dogs=str(tmp_path / "not_dogs"))
    result = core_train.train(cfg, str(data))
    core_train.export_trained(result, str(tmp_path / "b"), discover(str(data)))
    bundle = load_bundle(str(tmp_path / "b"))
    card = bundle.card["dog_score"]
    assert card["method"] == "logistic" and "6 non-dog photos" in card["fitted_on"]
    out = load_runtime(bundle, "openvino").infer(np.zeros((2, 32, 32, 3), np.uint8))
    assert out.dog_score.shape == (2,) and np.isfinite(out.dog_score).all()


def test_evaluate_checks_not_dogs_before_measuring_and_says_it_once(trained_bundles, tmp_path):
    """`evaluate --not-dogs`: a wrong folder is refused before the inference pass over --data (whose
    own error would come first), and a folder none of whose photos can be read is one error line,
    not a warning then the same as an error."""
    from tests.test_predict_cli import breedlabel

    bundle, _, data = trained_bundles
    broken = tmp_path / "broken" / next(p.name for p in sorted(data.iterdir()) if p.is_dir())
    broken.mkdir(parents=True)
    (broken / "cut.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    proc = breedlabel("evaluate", "--model", str(bundle), "--data", str(broken.parent),
                      "--not-dogs", str(tmp_path / "missing"), cache=tmp_path)
    ours = [line for line in proc.stderr.splitlines() if line.startswith("breedlabel")]
    assert proc.returncode == 2 and ours == [f"breedlabel evaluate: error: --not-dogs {tmp_path / 'missing'}: not a "
                                             "folder; give a folder of photos without a dog"], proc.stderr[-2000:]
    cats = tmp_path / "not_dogs" / "cats"
    cats.mkdir(parents=True)
    (cats / "cut.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    proc = breedlabel("evaluate", "--model", str(bundle), "--data", str(data), "--not-dogs", str(cats.parent),
                      cache=tmp_path)
    ours = [line for line in proc.stderr.splitlines() if line.startswith("breedlabel")]
    assert proc.returncode == 1 and ours == [f"breedlabel evaluate: error: --not-dogs {cats.parent}: none of its 1 "
                                             "photos could be read"], proc.stderr[-2000:]
    assert "evaluated" not in proc.stderr  # found before the pass over --data, not after it
