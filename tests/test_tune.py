"""Ray Tune over distributed training on real local Ray: a search interrupted after two trials,
resumed with Tuner.restore, with ASHA stopping a bad trial and the best config written.

The space is one choice between a learning rate that learns the synthetic classes in an epoch
and one that leaves the initial weights (chance top-1); the base config's value (the good
one) is evaluated first, then trials run one at a time so ASHA's rung (after 2 of 3 epochs:
BatchNorm statistics need a couple of dozen steps before validation means anything: batch 4,
24 steps an epoch) is set by it.
The interruption comes after the second trial because Tune does not carry ASHA's rung records
across Tuner.restore: trials after a restore are compared only with each other.
It runs on a 2-CPU Ray (the default on a 2-core machine: one trial's driver and one worker fit)
without a dashboard, where Ray Train's own PlacementGroupCleaner cannot tell that a trial's
controller died: every trial's workers must still be given back (jobs.tune_callbacks), or the next
trial waits for a CPU forever.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from core import search_space
from core.config import TrainConfig, smoke
from core.errors import ConfigError
from tests.fixtures.images import make_synthetic_dataset

pytestmark = pytest.mark.slow  # one Ray Tune search for the module: ~2 min on 2 cores
NUM_SAMPLES = 3
REPO = Path(__file__).resolve().parents[1]


# The search runs in a driver process of its own, as `breedlabel tune` does: Ctrl+C (SIGINT)
# goes to that process, and TensorFlow, OpenVINO and Ray state from other test modules cannot
# meet Tune's in one interpreter.
_DRIVER = """
import json, logging, os, signal, sys
from pathlib import Path
import ray
from ray.tune import Callback
from ray.util.placement_group import placement_group_table
from core import search_space
from core.config import smoke
from core.stop import Stopped
from jobs.tune import TuneConfig, run_tune

root, data = Path(sys.argv[1]), sys.argv[2]
marker, out = root / "interrupted", str(root / "out")


class InterruptAfter(Callback):
    # Ctrl+C once 2 trials have finished: Tune saves its state and stops the search.
    # Once only: a restored Tuner keeps the original run's callbacks.
    done = 0

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done += 1
        if self.done == 2 and not marker.exists():
            marker.write_text(trial.trial_id)
            os.kill(os.getpid(), signal.SIGINT)


base = smoke().replace(head_epochs=3, finetune_epochs=0, batch_size=4, head_lr=3e-3, early_stopping_patience=5,
                       augment={"crop_scale_min": 1.0, "flip": False})
space = {"head_lr": search_space.choice(3e-3, 1e-9)}
ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
progress = logging.getLogger("jobs.tune_callbacks")  # our progress lines, on stdout for the test
progress.setLevel(logging.INFO)
progress.addHandler(logging.StreamHandler(sys.stdout))
tc = TuneConfig(num_samples=%(n)d, max_concurrent=1, grace_period=2, reduction_factor=2,
                storage=str(root / "ray"), run_name="search", seed=1)
try:
    run_tune(tc, base, data, out, space=space, callbacks=[InterruptAfter()])
    error = None
except Stopped as exc:  # the search stopped (Tune saw the Ctrl-C): resume it with restore
    error = str(exc)
interrupted = {"error": error, "results_written": (Path(out) / "results.csv").exists()}
best = run_tune(tc, base, data, out, space=space, restore=True)
held = [pg for pg in placement_group_table().values() if pg["state"] != "REMOVED"]
print("RESULT " + json.dumps({"interrupted": interrupted, "best": best, "base": base.to_dict(), "held": held},
                             default=str))
"""


@pytest.fixture(scope="module")
def search(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    data = make_synthetic_dataset(root / "dogs", num_classes=3, images_per_class=40, size=32)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", _DRIVER % {"n": NUM_SAMPLES}, str(root), str(data)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    got = json.loads(lines[-1][len("RESULT "):])
    return {"out": root / "out", "best": got["best"], "interrupted": got["interrupted"],
            "base": TrainConfig.from_dict(got["base"]), "held": got["held"],
            "ended": [line for line in proc.stdout.splitlines() if " trials ended in " in line]}


def test_interrupted_search_resumes_with_restore(search):
    assert "stopped after 2 of 3 trials (stopped by SIGINT)" in search["interrupted"]["error"]
    assert not search["interrupted"]["results_written"]
    table = pd.read_csv(search["out"] / "results.csv")
    assert len(table) == NUM_SAMPLES  # the restored search finished the same trials, no extra ones
    assert (table["status"] == "OK").all()
    assert set(pd.read_parquet(search["out"] / "results.parquet")["trial_id"]) == set(table["trial_id"])
    # the restored search counts the trials ended before the stop: "3 of 3", not "1 of 3" again
    assert [line.split(": ")[-1].split(" trials")[0] for line in search["ended"]] == ["1 of 3", "2 of 3", "3 of 3"], \
        search["ended"]


def test_every_trial_gives_its_cpus_back_on_two_cpus(search):
    """Three trials ran one after the other on 2 CPUs, and nothing stays reserved after them."""
    assert len(pd.read_csv(search["out"] / "results.csv")) == NUM_SAMPLES
    assert search["held"] == []


def test_asha_stops_bad_trials_and_best_config_is_written(search):
    table = pd.read_csv(search["out"] / "results.csv")
    assert table["early_stopped"].any(), table.to_string()
    assert not table.loc[0, "early_stopped"]  # the best trial ran all its epochs
    best_cfg = TrainConfig.from_dict(json.loads((search["out"] / "best_config.json").read_text()))
    assert best_cfg.head_lr == pytest.approx(3e-3)
    assert best_cfg.classes is None and best_cfg.backbone == search["base"].backbone
    best = json.loads((search["out"] / "best_trial.json").read_text())
    assert best["val_top1"] == pytest.approx(table["val_top1"].max())


def test_search_space_checks_and_apply():
    base = smoke()
    search_space.check_space(search_space.get_space("cpu"), base)
    search_space.check_space(search_space.get_space("default"), base)
    with pytest.raises(ConfigError, match="not a TrainConfig field"):
        search_space.check_space({"head_lrr": search_space.loguniform(1e-3, 1e-2)}, base)
    cfg = search_space.apply(base, {"head_lr": 0.005, "augment.contrast": 0.1, "grayscale": True})
    assert (cfg.head_lr, cfg.augment.contrast, cfg.grayscale) == (0.005, 0.1, True)
    assert search_space.base_point({"head_lr": search_space.loguniform(1e-3, 1e-1)}, base) == {"head_lr": base.head_lr}
    assert search_space.base_point({"head_lr": search_space.loguniform(1.0, 2.0)}, base) is None


def test_a_weights_file_and_a_space_of_backbones_fail_before_any_trial(tmp_path):
    """The README's tune command once sampled ResNet50 with MobileNetV2's .h5 ("Layer count mismatch"
    in a trial): now refused up front, saying what to pass."""
    weights = tmp_path / "mobilenet_v2.h5"
    weights.write_bytes(b"")
    base = smoke().replace(backbone="mobilenet_v2", weights=str(weights))
    with pytest.raises(ConfigError, match="--space cpu"):
        search_space.check_space(search_space.get_space("default"), base)
    search_space.check_space(search_space.get_space("cpu"), base)  # no backbone dimension: fine
