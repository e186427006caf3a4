"""`breedlabel train` end to end through jobs.cli (a subprocess, as a user runs it), then
`predict` on the bundle it wrote: options reach the config, the card and the exported graph."""
from __future__ import annotations

import json

from core.bundle import load_bundle
from tests.fixtures.images import make_synthetic_dataset
from tests.test_predict_cli import breedlabel


def test_train_cli_exports_a_bundle_that_predicts(tmp_path):
    data = make_synthetic_dataset(tmp_path / "ds", num_classes=3, images_per_class=8, size=56)
    out = tmp_path / "bundle"
    proc = breedlabel("train", "--data", str(data), "--out", str(out), "--preset", "smoke", "--input-size", "48",
                      "--tta-sizes", "32", "--tta-flip", "--finetune-layers", "0", cache=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    bundle = load_bundle(str(out))
    card = bundle.card
    assert card["train_config"]["tta_sizes"] == [32] and card["input_size"] == 48
    assert {"top1_no_tta", "top1_flip_tta", "top1_sizes_tta", "top1_flip_sizes_tta"} <= set(card["metrics"])
    assert card["metrics"]["tta_sizes"] == summary["tta_sizes"] and summary["top1"] == round(card["metrics"]["top1"], 4)
    photo = next(p for p in sorted(data.rglob("*")) if p.is_file())
    proc = breedlabel("predict", str(photo), "--model", str(out), "--json", cache=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = json.loads(proc.stdout)["results"]
    assert len(result["top_k"]) == 3 and sum(p["prob"] for p in result["top_k"]) <= 1.0 + 1e-5
