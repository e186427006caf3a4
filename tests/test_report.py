"""The evaluation report: figures from plain arrays, and a whole report for a tiny model."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core import report
from core.errors import InputError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


def _referenced_images(html_path: Path) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', html_path.read_text(encoding="utf-8"))


def _assert_valid_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 100 and im.height > 100


def test_report_for_tiny_model_references_every_plot(tiny_bundle, image_factory, tmp_path):
    from core.predict import Predictor

    data = image_factory.dataset(num_classes=4, images_per_class=5, size=48)
    paths = sorted(str(p) for p in data.rglob("*.jpg"))
    folders = sorted({Path(p).parent.name for p in paths})
    y_true = np.array([folders.index(Path(p).parent.name) for p in paths])
    predictor = Predictor(str(tiny_bundle))
    results = predictor.predict_paths(paths, with_probs=True)
    probs = np.stack([r.probs for r in results])
    history = {"probe": {"loss": [1.4, 1.1], "val_loss": [1.3, 1.2], "accuracy": [0.4, 0.6],
                         "val_accuracy": [0.45, 0.5]},
               "finetune": {"loss": [0.9], "val_loss": [1.0], "accuracy": [0.7], "val_accuracy": [0.6]}}
    history_file = tmp_path / "history.json"
    history_file.write_text(json.dumps(history))

    out = tmp_path / "eval"
    result = report.write_report(out, y_true, probs, predictor.classes, image_paths=paths,
                                 history=str(history_file), details={"model_id": predictor.bundle.model_id})

    html_path = Path(result.uri)
    assert html_path == out / report.REPORT_FILE
    referenced = _referenced_images(html_path)
    expected = {report.PER_CLASS_PNG, report.TOPK_PNG, report.RELIABILITY_PNG, report.CONFUSION_PNG,
                report.HISTORY_PNG}
    if result.summary.confused_pairs:
        expected.add(report.PAIRS_PNG)
    assert {Path(r).name for r in referenced} == expected
    assert sorted(referenced) == sorted(result.plots)
    on_disk = {p.name for p in (out / report.PLOTS_DIR).iterdir()}
    assert on_disk == expected, "every plot written is referenced, and nothing else is written"
    for rel in referenced:
        _assert_valid_png(out / rel)
    text = html_path.read_text(encoding="utf-8")
    assert predictor.bundle.model_id in text and "ECE" in text
    assert 0.0 <= result.summary.top1 <= result.summary.top3 <= 1.0
    shutil.copytree(out, ARTIFACTS / "report_tiny_model", dirs_exist_ok=True)  # for a person to look at


def test_confused_pairs_with_thumbnails(image_factory, tmp_path):
    data = image_factory.dataset(num_classes=3, images_per_class=4, size=48)
    paths = sorted(str(p) for p in data.rglob("*.jpg"))
    y_true = np.repeat([0, 1, 2], 4)
    probs = np.eye(3)[y_true] * 0.7 + 0.1
    probs[[0, 1, 4]] = [[0.1, 0.8, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1]]  # 0→1 twice, 1→0 once
    result = report.write_report(tmp_path / "r", y_true, probs, ["a", "b", "c"], image_paths=paths)
    assert result.summary.confused_pairs[0] == {"a": "a", "b": "b", "a_as_b": 2, "b_as_a": 1}
    assert f"{report.PLOTS_DIR}/{report.PAIRS_PNG}" in result.plots
    assert f"{report.PLOTS_DIR}/{report.HISTORY_PNG}" not in result.plots  # no history given
    _assert_valid_png(tmp_path / "r" / report.PLOTS_DIR / report.PAIRS_PNG)


def test_topk_curve_is_monotone_and_ends_at_one():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(12), size=200)
    y = rng.integers(0, 12, 200)
    curve = report.topk_accuracy(y, probs)
    assert len(curve) == report.MAX_K
    assert np.all(np.diff(curve) >= 0)
    assert report.topk_accuracy(y, probs, max_k=12)[-1] == 1.0


def test_calibration_ece():
    y = np.array([0, 0, 1, 1])
    sure_and_right = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert report.calibration(y, sure_and_right)[-1] == pytest.approx(0.0)
    sure_and_wrong = sure_and_right[::-1]
    assert report.calibration(y, sure_and_wrong)[-1] == pytest.approx(1.0)
    conf, acc, counts, edges, _ = report.calibration(y, sure_and_right)
    assert counts.sum() == 4 and len(edges) == report.CALIBRATION_BINS + 1


def test_worst_classes_include_what_they_are_confused_with():
    m = np.diag([10, 10, 10, 10])
    m[2, 2], m[2, 3] = 2, 8
    assert report.worst_classes(m, count=4) == [2, 3]


@pytest.mark.parametrize("history, keys, boundaries", [
    ({"loss": [1.0, 0.5], "val_loss": [1.1, None]}, {"loss", "val_loss"}, []),
    ([{"epoch": 0, "loss": 1.0}, {"epoch": 1, "loss": 0.5}], {"loss"}, []),
    ({"history": {"loss": [1.0]}}, {"loss"}, []),
    ({"probe": {"loss": [1.0, 0.9]}, "finetune": [{"loss": 0.8, "top1": 0.5}]}, {"loss", "top1"}, [2]),
    ({"config": "x"}, set(), []),
])
def test_load_history_forms(history, keys, boundaries):
    series, found = report.load_history(history)
    assert set(series) == keys
    assert found == boundaries
    assert len({len(v) for v in series.values()}) <= 1, "all series cover the same epochs"


def test_bad_inputs_are_input_errors(tmp_path):
    probs = np.full((3, 2), 0.5)
    with pytest.raises(InputError, match="expected"):
        report.write_report(tmp_path, [0, 1, 0], probs, ["a", "b", "c"])
    with pytest.raises(InputError, match="labels"):
        report.write_report(tmp_path, [0, 1], probs, ["a", "b"])
    with pytest.raises(InputError, match="class indices"):
        report.write_report(tmp_path, [0, 1, 5], probs, ["a", "b"])
    with pytest.raises(InputError, match="image paths"):
        report.write_report(tmp_path, [0, 1, 0], probs, ["a", "b"], image_paths=["x"])


@pytest.mark.parametrize("flag", ["--report", "--no-report"])
def test_evaluate_cli_writes_report_next_to_metrics(tiny_bundle, image_factory, tmp_path, monkeypatch, flag):
    from jobs import cli

    monkeypatch.setattr(cli, "COMMANDS", {"evaluate": cli.COMMANDS["evaluate"]})
    data = image_factory.dataset(num_classes=3, images_per_class=3, size=48)
    history = tmp_path / "history.json"
    history.write_text(json.dumps({"head": {"loss": [1.0, 0.8], "val_top1": [0.3, 0.4]}}))
    out = tmp_path / "eval" / "metrics.json"
    code = cli.main(["evaluate", "--model", str(tiny_bundle), "--data", str(data), "--out", str(out),
                     "--history", str(history), flag])
    assert code == 0 and out.exists()
    html_path = out.parent / report.REPORT_FILE
    if flag == "--no-report":
        assert not html_path.exists() and not (out.parent / report.PLOTS_DIR).exists()
        return
    referenced = _referenced_images(html_path)
    assert f"{report.PLOTS_DIR}/{report.HISTORY_PNG}" in referenced
    for rel in referenced:
        _assert_valid_png(out.parent / rel)
