"""`breedlabel predict` / `evaluate` end to end through jobs.cli (a subprocess, as a user runs it)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.breeds import STANFORD_DOGS

REPO = Path(__file__).resolve().parents[1]


def breedlabel(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, BREEDLABEL_CACHE=str(cache), TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i, breed in enumerate(STANFORD_DOGS[:2]):
        folder = root / "data" / breed.folder
        folder.mkdir(parents=True)
        for j in range(3):
            arr = rng.integers(0, 256, (48 + 8 * j, 64, 3), dtype=np.uint8)
            Image.fromarray(arr).save(folder / f"{j}.jpg", quality=90)
    (root / "fake.jpg").write_text("this is not a JPEG\n")
    return root


def _good(photos: Path) -> str:
    return str(photos / "data" / STANFORD_DOGS[0].folder / "0.jpg")


def _error_lines(stderr: str) -> list[str]:
    """Our own error lines (TensorFlow's C++ logging may add unrelated lines on stderr)."""
    return [line for line in stderr.splitlines() if line.startswith("breedlabel")]


def test_predict_prints_top3(tiny_bundle, photos, tmp_path):
    proc = breedlabel("predict", _good(photos), "--model", str(tiny_bundle), cache=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == _good(photos) and len(lines) == 4
    names = {b.display for b in STANFORD_DOGS[:4]}
    probs = []
    for line in lines[1:]:
        body = line.split(".", 1)[1].rsplit(None, 1)
        assert body[0].strip() in names
        probs.append(float(body[1].rstrip("%")) / 100)
    assert probs == sorted(probs, reverse=True) and sum(probs) <= 1.0 + 1e-3


def test_text_file_named_jpg_is_one_line_error(tiny_bundle, photos, tmp_path):
    fake = str(photos / "fake.jpg")
    proc = breedlabel("predict", fake, "--model", str(tiny_bundle), cache=tmp_path)
    assert proc.returncode == 1
    assert _error_lines(proc.stderr) == [f"breedlabel predict: error: {fake}: not an image"]
    assert "Traceback" not in proc.stderr and proc.stdout == ""


@pytest.mark.slow
def test_mixed_inputs_print_good_ones_and_fail(tiny_bundle, photos, tmp_path):
    fake = str(photos / "fake.jpg")
    proc = breedlabel("predict", _good(photos), fake, "--model", str(tiny_bundle), "--json",
                      "--runtime", "tensorflow", cache=tmp_path)
    assert proc.returncode == 1
    doc = json.loads(proc.stdout)
    assert doc["runtime"] == "tensorflow" and len(doc["model_id"]) == 64
    good, bad = doc["results"]
    assert good["error"] is None and len(good["top_k"]) == 3
    assert sum(p["prob"] for p in good["top_k"]) <= 1.0 + 1e-6
    assert bad == {"image": fake, "top_k": None, "error": "not an image", "width": None, "height": None,
                   "dog_score": None, "is_dog": None}
    assert _error_lines(proc.stderr) == [f"breedlabel predict: error: {fake}: not an image"]


def test_unreadable_inputs_say_why_in_their_error_line(tiny_bundle, photos, tmp_path):
    """A folder or an http URL: the error line itself says what to do, with no log line besides."""
    folder, url = str(photos / "data"), "https://example.com/x.jpg"
    proc = breedlabel("predict", folder, url, "--model", str(tiny_bundle), cache=tmp_path)
    assert proc.returncode == 1
    assert _error_lines(proc.stderr) == [
        f"breedlabel predict: error: {folder}: not a regular file (a directory); give a file",
        f"breedlabel predict: error: {url}: unsupported URI scheme; use a local path, file://PATH or s3://BUCKET/KEY"]
    assert "WARNING" not in proc.stderr and proc.stdout == ""


def test_tensorflow_runtime_start_up_lines_stay_off_the_terminal(tiny_bundle, photos, tmp_path):
    """absl, oneDNN and cuInit lines go to the TensorFlow log file, not to stderr."""
    proc = breedlabel("predict", _good(photos), "--model", str(tiny_bundle), "--runtime", "tensorflow", cache=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "" and len(proc.stdout.splitlines()) == 4


def test_missing_model_is_a_clear_error(photos, tmp_path):
    missing = str(tmp_path / "no-such-bundle")
    proc = breedlabel("predict", _good(photos), "--model", missing, cache=tmp_path)
    assert proc.returncode == 1
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1 and missing in lines[0] and "not found" in lines[0]
    assert "Traceback" not in proc.stderr


def test_evaluate_writes_metrics(tiny_bundle, photos, tmp_path):
    out = tmp_path / "metrics.json"
    proc = breedlabel("evaluate", "--model", str(tiny_bundle), "--data", str(photos / "data"),
                      "--out", str(out), cache=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "top-1:" in proc.stdout and "top-3:" in proc.stdout
    metrics = json.loads(out.read_text())
    assert metrics["count"] == 6 and 0.0 <= metrics["top1"] <= metrics["top3"] <= 1.0
    assert set(metrics["per_class"]) == {b.id for b in STANFORD_DOGS[:4]}
    assert metrics["per_class"][STANFORD_DOGS[3].id] is None  # no samples
    assert np.asarray(metrics["confusion"]).sum() == 6


def test_evaluate_compares_sources_side_by_side(tiny_bundle, photos, tmp_path):
    """Several --data folders (crops, full scenes): one line each, and the whole in the metrics."""
    import shutil

    scenes = tmp_path / "scenes"
    shutil.copytree(photos / "data" / STANFORD_DOGS[1].folder, scenes / STANFORD_DOGS[1].folder)
    out = tmp_path / "metrics.json"
    proc = breedlabel("evaluate", "--model", str(tiny_bundle), "--data", str(photos / "data"), "--data", str(scenes),
                      "--out", str(out), "--no-report", cache=tmp_path)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(out.read_text())
    by_source = metrics["by_source"]
    assert list(by_source) == [str(photos / "data"), str(scenes)]
    assert by_source[str(photos / "data")]["count"] == 6 and by_source[str(scenes)]["count"] == 3
    assert metrics["count"] == 9
    # the whole is the count-weighted mean of its sources
    assert metrics["top1"] == pytest.approx((6 * by_source[str(photos / "data")]["top1"]
                                             + 3 * by_source[str(scenes)]["top1"]) / 9)
    assert str(scenes) in proc.stdout and "source" in proc.stdout
