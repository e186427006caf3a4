"""`breedlabel evaluate` refusals a user meets: where the metrics go, what could not be measured."""
from __future__ import annotations

import json
import shutil

from core.breeds import STANFORD_DOGS
from tests.test_predict_cli import breedlabel, photos  # noqa: F401 (photos: the module fixture)


def _last_line(stderr: str) -> str:
    return [line for line in stderr.splitlines() if line.startswith("breedlabel")][-1]


def test_evaluate_refuses_outputs_it_could_not_write_before_measuring(tiny_bundle, photos, tmp_path):  # noqa: F811
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = {"s3://bucket/m.json": "evaluate writes a local metrics file",
             str(tmp_path): "is a folder; give the metrics file's name",
             str(a_file / "m.json"): "a_file: is a file; give a folder for the metrics (--out)"}
    for out, message in cases.items():
        proc = breedlabel("evaluate", "--model", str(tiny_bundle), "--data", str(photos / "data"), "--out", out,
                          cache=tmp_path)
        assert proc.returncode != 0 and message in _last_line(proc.stderr), proc.stderr[-2000:]
        assert "top-1" not in proc.stdout  # refused before the inference pass
    proc = breedlabel("evaluate", "--model", str(tiny_bundle), "--data", str(photos / "data"), "--history",
                      str(photos / "data" / STANFORD_DOGS[0].folder / "0.jpg"), cache=tmp_path)
    assert proc.returncode != 0 and "not a readable history.json" in _last_line(proc.stderr)
    assert not (tmp_path / "s3:").exists()


def test_nothing_readable_is_an_error_and_the_metrics_are_strict_json(tiny_bundle, photos, tmp_path):  # noqa: F811
    broken = tmp_path / "broken" / STANFORD_DOGS[0].folder
    broken.mkdir(parents=True)
    (broken / "cut.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    proc = breedlabel("evaluate", "--model", str(tiny_bundle), "--data", str(broken.parent),
                      "--out", str(tmp_path / "m.json"), cache=tmp_path)
    assert proc.returncode == 1 and "none of the 1 photos could be read" in _last_line(proc.stderr)
    assert not (tmp_path / "m.json").exists()
    # the same folder given twice is one source; a metric with nothing to measure is null, not NaN
    one = tmp_path / "one"
    shutil.copytree(photos / "data" / STANFORD_DOGS[0].folder, one / STANFORD_DOGS[0].folder)
    out = tmp_path / "m2.json"
    proc = breedlabel("evaluate", "--model", str(tiny_bundle), "--data", str(one), "--data", str(one),
                      "--out", str(out), "--no-report", cache=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads(out.read_text(), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    assert metrics["count"] == 3 and metrics["data"] == str(one) and "by_source" not in metrics

