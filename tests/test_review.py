"""`breedlabel review`: a Label Studio import file of a label output, most uncertain rows first."""
from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from core import review
from tests.fixtures.label_output import write_label_output


def test_uncertainty_weighs_the_breed_margin_and_the_dog_flag():
    probs = np.array([[0.9, 0.05], [0.5, 0.45], [0.9, 0.05], [0.9, 0.05]])
    dog = np.array([0.95, 0.95, 0.52, 0.02])
    u = review.uncertainty(probs, dog, threshold=0.5)
    assert u[1] > u[0] and u[2] > u[0] and u[2] > u[3]  # close margin, near the threshold
    assert u[2] == pytest.approx(1 - 0.02 / 0.5)
    assert u[3] == pytest.approx(1 - 0.48 / 0.5)  # a clear non-dog: its breed margin does not count
    no_score = review.uncertainty(probs, np.full(4, np.nan), threshold=0.5)
    assert np.allclose(no_score, 1 - (probs[:, 0] - probs[:, 1]))


@pytest.fixture
def output(tmp_path):
    images = [(f"s3://bucket/photos/{i}.jpg", None, None) for i in range(6)]
    images += [("s3://bucket/a.zip", "in/0.jpg", None), ("s3://bucket/bad.jpg", None, "not an image")]
    scores = [0.9, 0.1, 0.55, 0.97, 0.3, 0.8, 0.9]  # one per labelled row (the member's last)
    return write_label_output(tmp_path / "out", images, dog_scores=scores)


def test_queue_is_ordered_most_uncertain_first_in_label_studio_format(output, tmp_path):
    to, config = tmp_path / "review.json", tmp_path / "review.xml"
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "review", output, "--to", str(to),
                           "--labeling-config", str(config)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "6 tasks of 6 labelled inputs (8 rows in 1 finished run(s)" in proc.stderr
    assert "1 archive members skipped" in proc.stderr
    tasks = json.loads(to.read_text())
    scores = [t["data"]["uncertainty"] for t in tasks]
    assert scores == sorted(scores, reverse=True)
    assert all(t["data"]["image"].startswith("s3://bucket/photos/") for t in tasks)  # no member, no error row
    choices = {c.get("value") for c in ET.fromstring(config.read_text()).iter("Choice")}
    for task in tasks:  # Label Studio's import format: data + predictions of `choices` results
        assert set(task) == {"data", "predictions"}
        for pred in task["predictions"]:
            assert {"model_version", "score", "result"} <= set(pred)
            (result,) = pred["result"]
            assert result["from_name"] == review.FROM_NAME and result["to_name"] == review.TO_NAME
            assert result["type"] == "choices" and set(result["value"]["choices"]) <= choices
        breeds = [p for p in task["predictions"] if p["result"][0]["value"]["choices"] != [review.NOT_A_DOG]]
        assert len(breeds) == 3 and [p["score"] for p in breeds] == sorted((p["score"] for p in breeds), reverse=True)
        flagged = task["data"]["is_dog"] is False
        assert flagged == (task["predictions"][0]["result"][0]["value"]["choices"] == [review.NOT_A_DOG])
        assert flagged == (task["data"]["dog_score"] < 0.5)


def test_limit_keeps_the_most_uncertain(output, tmp_path):
    full, top = tmp_path / "all.json", tmp_path / "top.json"
    for path, extra in ((full, []), (top, ["--limit", "2"])):
        subprocess.run([sys.executable, "-m", "jobs.cli", "review", output, "--to", str(path), *extra], check=True,
                       capture_output=True)
    assert json.loads(top.read_text()) == json.loads(full.read_text())[:2]


def test_an_output_without_runs_fails_saying_why(tmp_path):
    """Exit 1, what it needs is not there (2 told a scheduler running label then review that the
    command was wrong); a mistyped path is "no such folder", not "no finished labelling run"."""
    for out, why in ((tmp_path / "nothing", "no such folder; give the --out of a label run"),
                     (tmp_path, "no finished labelling run there yet")):
        proc = subprocess.run([sys.executable, "-m", "jobs.cli", "review", str(out), "--to", str(tmp_path / "r.json")],
                              capture_output=True, text=True)
        assert proc.returncode == 1 and f"{out}: {why}" in proc.stderr, proc.stderr


def _review(output: str, to, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", "review", output, "--to", str(to), *extra],
                          capture_output=True, text=True)


def test_an_input_labelled_again_is_one_task_from_its_newest_row(tmp_path):
    """After `--relabel` (or another model) an input has two rows; the queue shows it once, as the
    newest row says (the rule the README gives readers)."""
    import time

    images = [(f"s3://bucket/p/{i}.jpg", None, None) for i in range(3)]
    root = write_label_output(tmp_path / "out", images, run_id="20250101T000000Z-aaaaaa", dog_scores=[0.9] * 3)
    time.sleep(0.01)
    write_label_output(root, images[:2], run_id="20250101T010000Z-bbbbbb", seed=1, dog_scores=[0.2, 0.9])
    proc = _review(root, tmp_path / "r.json")
    assert proc.returncode == 0 and "3 tasks of 3 labelled inputs (5 rows in 2 finished run(s)" in proc.stderr, \
        proc.stderr
    tasks = {t["data"]["uri"]: t["data"] for t in json.loads((tmp_path / "r.json").read_text())}
    assert sorted(tasks) == [u for u, _, _ in images]
    assert [tasks[u]["run_id"] for u, _, _ in images] == ["20250101T010000Z-bbbbbb"] * 2 + ["20250101T000000Z-aaaaaa"]
    first = tasks["s3://bucket/p/0.jpg"]
    assert first["dog_score"] == pytest.approx(0.2) and first["is_dog"] is False


def test_dog_threshold_flags_the_rows_as_a_label_run_with_it_would(tmp_path):
    """`--dog-threshold 0.2` on rows a run flagged at 0.5 ordered by 0.2 but still said "not a dog"
    for scores 0.46, 0.33, 0.21; without it, each row keeps its run's flag and is ordered by the
    threshold its run recorded (here 0.3), not by 0.5."""
    images = [(f"s3://bucket/p/{i}.jpg", None, None) for i in range(4)]
    scores = [0.46, 0.33, 0.21, 0.1]
    root = write_label_output(tmp_path / "out", images, dog_scores=scores, dog_threshold=0.3)

    def tasks(*extra):
        assert _review(root, tmp_path / "r.json", *extra).returncode == 0
        return {t["data"]["uri"]: t for t in json.loads((tmp_path / "r.json").read_text())}

    def said_not_a_dog(task):
        return task["predictions"][0]["result"][0]["value"]["choices"] == [review.NOT_A_DOG]

    own = tasks()
    assert [own[u]["data"]["is_dog"] for u, _, _ in images] == [True, True, False, False]
    assert [said_not_a_dog(own[u]) for u, _, _ in images] == [False, False, True, True]
    assert own["s3://bucket/p/1.jpg"]["data"]["uncertainty"] >= 1 - 0.03 / 0.7 - 1e-6  # 0.03 above its 0.3
    low = tasks("--dog-threshold", "0.2")
    assert [low[u]["data"]["is_dog"] for u, _, _ in images] == [True, True, True, False]
    assert [said_not_a_dog(low[u]) for u, _, _ in images] == [False, False, False, True]
    assert low["s3://bucket/p/2.jpg"]["data"]["uncertainty"] >= 1 - 0.01 / 0.8 - 1e-6  # 0.01 above 0.2


def test_a_score_at_the_threshold_is_a_dog_as_the_label_run_said(tmp_path):
    """Label compares float32 scores to the threshold; review compared the stored float32 widened
    to float64 (0.699999988 < 0.7) and turned a dog at exactly 0.7 into "not a dog"."""
    images = [("s3://bucket/p/0.jpg", None, None), ("s3://bucket/p/1.jpg", None, None)]
    root = write_label_output(tmp_path / "out", images, dog_scores=[0.7, 0.65], dog_threshold=0.7)
    for extra in ((), ("--dog-threshold", "0.7")):
        assert _review(root, tmp_path / "r.json", *extra).returncode == 0
        flags = {t["data"]["uri"]: t["data"]["is_dog"] for t in json.loads((tmp_path / "r.json").read_text())}
        assert flags == {"s3://bucket/p/0.jpg": True, "s3://bucket/p/1.jpg": False}, extra


def test_a_run_folder_given_for_the_output_names_the_output(tmp_path):
    root = write_label_output(tmp_path / "out", [("s3://bucket/p/0.jpg", None, None)])
    run = f"{root}/run_id=20250101T000000Z-abcdef"
    proc = _review(run, tmp_path / "r.json")
    assert proc.returncode == 1 and f"one run's folder of the output {root}; give the output itself" in proc.stderr


def test_local_photos_open_through_label_studios_local_files_server(tmp_path):
    photo = tmp_path / "photos" / "a b#1.jpg"
    root = write_label_output(tmp_path / "out", [(str(photo), None, None)])
    proc = _review(root, tmp_path / "r.json", "--local-files-root", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    (task,) = json.loads((tmp_path / "r.json").read_text())
    assert task["data"]["image"] == "/data/local-files/?d=photos/a%20b%231.jpg" and task["data"]["uri"] == str(photo)
    proc = _review(root, tmp_path / "r2.json")  # the default root, /
    assert json.loads((tmp_path / "r2.json").read_text())[0]["data"]["image"].endswith(
        "?d=" + str(photo).lstrip("/").replace(" ", "%20").replace("#", "%23"))
    proc = _review(root, tmp_path / "r3.json", "--local-files-root", str(tmp_path / "elsewhere"))
    assert proc.returncode != 0 and "not under --local-files-root" in proc.stderr
    proc = _review(root, tmp_path / "r4.json", "--dog-threshold", "2")
    assert proc.returncode == 2 and "between 0 and 1" in proc.stderr


def test_a_photo_whose_name_is_not_utf8_keeps_its_bytes(tmp_path):
    """A Latin-1 file name is labelled as a file:// URI with %XX escapes; review died on it with a
    UnicodeEncodeError traceback and wrote no review file at all."""
    uri = "file://" + str(tmp_path / "photos").replace(" ", "%20") + "/caf%E9.jpg"
    root = write_label_output(tmp_path / "out", [(uri, None, None), (str(tmp_path / "photos" / "b.jpg"), None, None)])
    proc = _review(root, tmp_path / "r.json", "--local-files-root", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    images = sorted(task["data"]["image"] for task in json.loads((tmp_path / "r.json").read_text()))
    assert images == ["/data/local-files/?d=photos/b.jpg", "/data/local-files/?d=photos/caf%E9.jpg"]
