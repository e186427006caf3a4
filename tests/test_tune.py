"""Ray Tune over distributed training on real local Ray: a search interrupted after two trials,
resumed with Tuner.restore, with ASHA stopping a bad trial and the best config written.

The space is one choice between a learning rate that learns the synthetic classes in an epoch
and one that leaves the initial weights (chance top-1); the base config's value (the good
one) is evaluated first, then trials run one at a time so ASHA's rung (after 2 of 3 epochs:
BatchNorm statistics need a couple of dozen steps before validation means anything) is set by it.
The interruption comes after the second trial because Tune does not carry ASHA's rung records
across Tuner.restore: trials after a restore are compared only with each other.
"""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pandas as pd
import pytest

from core import search_space as ss
from core.config import TrainConfig, smoke
from core.errors import ConfigError, JobError
from tests.fixtures.images import make_synthetic_dataset

NUM_SAMPLES = 3


def _interrupt_after(count: int, marker: Path):
    """Ctrl+C once `count` trials have finished: Tune saves its state and stops the search.
    Once only: a restored Tuner keeps the original run's callbacks."""
    from ray.tune import Callback

    class InterruptAfter(Callback):
        done = 0

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done += 1
            if self.done == count and not marker.exists():
                marker.write_text(trial.trial_id)
                os.kill(os.getpid(), signal.SIGINT)

    return InterruptAfter()


@pytest.fixture(scope="module")
def search(ray_local, tmp_path_factory):
    from jobs.tune import TuneConfig, run_tune

    root = tmp_path_factory.mktemp("tune")
    data = make_synthetic_dataset(root / "dogs", num_classes=3, images_per_class=40, size=32)
    base = smoke().replace(head_epochs=3, finetune_epochs=0, batch_size=8, head_lr=3e-3, early_stopping_patience=5,
                           augment={"crop_scale_min": 1.0, "flip": False})
    space = {"head_lr": ss.choice(3e-3, 1e-9)}
    tc = TuneConfig(num_samples=NUM_SAMPLES, max_concurrent=1, grace_period=2, reduction_factor=2,
                    storage=str(root / "ray"), name="search", seed=1)
    out = str(root / "out")
    with pytest.raises(JobError, match="--restore") as crash:
        run_tune(tc, base, str(data), out, space=space, callbacks=[_interrupt_after(2, root / "interrupted")])
    interrupted = {"error": str(crash.value), "results_written": (Path(out) / "results.csv").exists()}
    best = run_tune(tc, base, str(data), out, space=space, restore=True)
    return {"out": Path(out), "best": best, "interrupted": interrupted, "base": base}


def test_interrupted_search_resumes_with_restore(search):
    assert "stopped after 2 of 3 trials (interrupted)" in search["interrupted"]["error"]
    assert not search["interrupted"]["results_written"]
    table = pd.read_csv(search["out"] / "results.csv")
    assert len(table) == NUM_SAMPLES  # the restored search finished the same trials, no extra ones
    assert (table["status"] == "OK").all()
    assert set(pd.read_parquet(search["out"] / "results.parquet")["trial_id"]) == set(table["trial_id"])


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
    ss.check_space(ss.get_space("cpu"), base)
    ss.check_space(ss.get_space("default"), base)
    with pytest.raises(ConfigError, match="not a TrainConfig field"):
        ss.check_space({"head_lrr": ss.loguniform(1e-3, 1e-2)}, base)
    cfg = ss.apply(base, {"head_lr": 0.005, "augment.contrast": 0.1, "grayscale": True})
    assert (cfg.head_lr, cfg.augment.contrast, cfg.grayscale) == (0.005, 0.1, True)
    assert ss.base_point({"head_lr": ss.loguniform(1e-3, 1e-1)}, base) == {"head_lr": base.head_lr}
    assert ss.base_point({"head_lr": ss.loguniform(1.0, 2.0)}, base) is None
