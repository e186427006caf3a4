"""`breedlabel train` end to end through jobs.cli (a subprocess, as a user runs it), then
`predict` on the bundle it wrote: options reach the config, the card and the exported graph."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from core.bundle import load_bundle
from tests.fixtures.crash import Point, job_env, train_command
from tests.fixtures.images import make_synthetic_dataset
from tests.test_predict_cli import REPO, breedlabel

# what a default `breedlabel train` may print: our log lines and Keras' epoch progress
OURS = re.compile(r"\d{4}-\d\d-\d\d [\d:,]+ (INFO|WARNING|ERROR) (core|jobs|cluster)\.|\d+/\d+ - |Epoch \d+/\d+$"
                  r"|Restoring model weights from the end of the best epoch")


def foreign_lines(stderr: str) -> list[str]:
    """Lines that are not ours (TensorFlow's C++ start-up, library INFO logs, Ray workers' output)."""
    return [line for line in stderr.splitlines() if line.strip() and not OURS.match(line)]


@pytest.mark.slow
def test_train_cli_exports_a_bundle_that_predicts(tmp_path):
    data = make_synthetic_dataset(tmp_path / "ds", num_classes=3, images_per_class=8, size=56)
    out = tmp_path / "bundle"
    proc = breedlabel("train", "--data", str(data), "--out", str(out), "--preset", "smoke", "--input-size", "48",
                      "--tta-sizes", "32", "--tta-flip", "--finetune-layers", "0", cache=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert foreign_lines(proc.stderr) == [], proc.stderr[-3000:]  # no cuInit, absl, oneDNN or TF INFO lines
    assert (out.parent / "bundle.run" / "logs" / "tensorflow.log").is_file()  # they are kept there
    assert len(proc.stdout.strip().splitlines()) == 1  # stdout: the summary only
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


def test_offline_imagenet_weights_fail_in_one_line(tmp_path):
    """The default --weights imagenet with no network: keras' real download fails (a proxy that
    refuses connections stands in for "offline"), and the user reads one line saying what failed
    and what to pass instead, not urllib's traceback."""
    data = make_synthetic_dataset(tmp_path / "ds", num_classes=2, images_per_class=4, size=40)
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "http_proxy", "https_proxy")}
    env.update(HOME=str(tmp_path / "home"), https_proxy="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9",
               TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "train", "--data", str(data), "--out", str(tmp_path / "b"),
                           "--preset", "smoke", "--backbone", "mobilenet_v2", "--weights", "imagenet",
                           "--input-size", "32"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr[-3000:]
    line = proc.stderr.strip()
    assert line.startswith("breedlabel train: error: MobileNetV2: downloading its ImageNet weights from https://")
    assert "pass `--weights PATH.h5`" in line and "`--weights none`" in line and proc.stdout == ""


def test_a_destination_that_would_fail_the_export_fails_before_training(tmp_path):
    """`--out` (a folder of photos, a file), `--checkpoint-dir` (a file, the bundle's own folder)
    and the default checkpoint folder `<out>.run` (a file) are refused in the first seconds, before
    TensorFlow loads, not after an hour of training; nothing is trained or written."""
    data = make_synthetic_dataset(tmp_path / "ds", num_classes=2, images_per_class=4, size=40)
    photo = next(p for p in sorted(data.rglob("*.jpg")))
    (tmp_path / "c.run").write_text("not a folder")
    cases = [(["--out", str(photo.parent)], 1, f"{photo.parent}: the folder holds other files"),
             (["--out", str(photo)], 1, f"{photo}: is a file; give a folder for the bundle"),
             (["--out", str(tmp_path / "b"), "--checkpoint-dir", str(photo)], 1,
              f"{photo}: is a file; give a folder for checkpoints"),
             (["--out", str(tmp_path / "c")], 1, f"{tmp_path / 'c.run'}: is a file; give a folder for checkpoints"),
             (["--out", str(tmp_path / "d"), "--checkpoint-dir", str(tmp_path / "d")], 2,
              f"--checkpoint-dir {tmp_path / 'd'}: is inside the bundle's folder"),
             (["--out", str(tmp_path / "d"), "--checkpoint-dir", str(tmp_path / "d" / "run")], 2,
              f"--checkpoint-dir {tmp_path / 'd' / 'run'}: is inside the bundle's folder")]
    for options, code, message in cases:
        proc = breedlabel("train", "--data", str(data), "--preset", "smoke", *options, cache=tmp_path)
        assert proc.returncode == code, proc.stderr[-3000:]
        (line,) = proc.stderr.strip().splitlines()  # one line, no traceback
        assert line.startswith(f"breedlabel train: error: {message}"), line
    assert not (tmp_path / "b").exists() and not (tmp_path / "d").exists()
    assert [p.name for p in tmp_path.rglob("*.run")] == ["c.run"]


def test_sigterm_stops_training_with_one_line_and_exit_1(tmp_path):
    """A scheduler's or `jobs stop`'s SIGTERM ends a run as Ctrl-C does: exit 1, one line saying
    what was kept; not a silent 143."""
    import signal

    data = make_synthetic_dataset(tmp_path / "ds", num_classes=2, images_per_class=6, size=40)
    env = dict(os.environ, BREEDLABEL_CACHE=str(tmp_path), TF_CPP_MIN_LOG_LEVEL="3")
    proc, rest = _signal_once_training([sys.executable, "-m", "jobs.cli", "train", "--data", str(data), "--out",
                                        str(tmp_path / "b"), "--preset", "smoke", "--head-epochs", "500",
                                        "--input-size", "32"], env, signal.SIGTERM)
    assert proc.returncode == 1, rest[-3000:]
    last = [line for line in rest.splitlines() if line.startswith("breedlabel")][-1]
    assert last.startswith("breedlabel train: error: training stopped by SIGTERM, nothing exported"), last
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("point, during", [
    # the signal's Stopped swallowed by library code in an epoch's end, after training, in the export
    (Point("core.train_model:BestRestore.on_epoch_end", when="before", action="swallowed-term"), ""),
    (Point("core.train:train", when="after", action="swallowed-term"), ""),
    (Point("core.bundle:_save_serving_model", when="before", action="term"), " during the export"),
    (Point("core.datasets:discover", when="after", action="term"), ""),
], ids=["swallowed-in-an-epoch", "swallowed-after-training", "in-the-export", "before-training"])
def test_a_stop_is_never_lost_and_leaves_no_bundle(tmp_path, point, during):
    """SIGTERM whose `Stopped` TensorFlow swallows (a weakref callback, a broad except) still stops
    the run at the next batch or step, and a stop in the export removes what it wrote: exit 1,
    one line, never an exit 0 with a bundle after a stop."""
    data = make_synthetic_dataset(tmp_path / "ds", num_classes=2, images_per_class=6, size=40)
    out = tmp_path / "b"
    epochs = "500" if "epoch" in point.target else "1"
    proc = subprocess.run(train_command(["--data", str(data), "--out", str(out), "--preset", "smoke",
                                         "--head-epochs", epochs, "--finetune-layers", "0", "--input-size", "32"],
                                        point),
                          cwd=REPO, env=job_env({"BREEDLABEL_CACHE": str(tmp_path), "TF_CPP_MIN_LOG_LEVEL": "3"}),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    ours = [line for line in proc.stderr.splitlines() if line.startswith("breedlabel")]
    # the smoke preset trains on the fly: no features cached, none promised (the line claimed a cache)
    assert ours == [f"breedlabel train: error: training stopped by SIGTERM{during}, nothing exported"], \
        proc.stderr[-3000:]
    assert proc.stdout == "" and not out.exists()  # a stop in the export removes the folder it made


def test_the_stop_line_promises_a_feature_cache_only_where_there_is_one(tmp_path):
    from jobs.train import _has_features

    assert not _has_features(None) and not _has_features(str(tmp_path / "absent"))
    assert not _has_features(str(tmp_path))  # a run's folder with epoch weights only
    (tmp_path / "features-0a1b.npz").write_bytes(b"")
    assert _has_features(str(tmp_path)) and not _has_features("s3://bucket/run")


def test_a_second_signal_while_a_stopped_run_winds_down_keeps_exit_1(tmp_path):
    """Ctrl-C, then Ctrl-C again as the process exits: it died by the second signal (130/143)
    after its one line. The second signal here: SIGTERM from the exit path itself, after the line."""
    import signal

    data = make_synthetic_dataset(tmp_path / "ds", num_classes=2, images_per_class=6, size=40)
    cmd = train_command(["--data", str(data), "--out", str(tmp_path / "b"), "--preset", "smoke", "--head-epochs",
                         "500", "--input-size", "32"],
                        Point("jobs.ray_session:shutdown_uninterruptible", when="before", action="term"))
    env = job_env({"BREEDLABEL_CACHE": str(tmp_path), "TF_CPP_MIN_LOG_LEVEL": "3"})
    proc, rest = _signal_once_training(cmd, env, signal.SIGINT)
    assert proc.returncode == 1, rest[-3000:]
    ours = [line for line in rest.splitlines() if line.startswith("breedlabel")]
    assert ours == ["breedlabel train: error: training stopped by SIGINT, nothing exported"], rest[-2000:]


def _signal_once_training(cmd: list[str], env: dict, sig: int) -> tuple[subprocess.Popen, str]:
    """Run `cmd` (a train of --head-epochs 500), send `sig` once it trains; (process, its stderr)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if re.search(r"Epoch \d+/500|head \d+/500", line):
            break
    proc.send_signal(sig)
    _, rest = proc.communicate(timeout=120)
    return proc, "".join(seen) + rest
