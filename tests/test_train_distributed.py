"""Distributed training over real local Ray: 2 workers train and export; a killed worker resumes.

Tiny data (3 synthetic classes at 40 px), the smoke preset's custom CNN.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import pytest

from core.config import smoke
from tests.fixtures.images import make_synthetic_dataset


@pytest.fixture(scope="module")
def tiny_dogs(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("data") / "dogs", num_classes=3,
                                  images_per_class=12, size=40)


def _kill_once(rank: int, *, marker: str, at_epoch: int, victim: int, run_dir: str) -> list:
    """Worker callbacks for the test: worker `victim` dies hard at `at_epoch`, once. First it
    waits until Ray Train's controller has registered the previous epoch's checkpoint (its
    checkpoint-manager snapshot names it): a report the controller has not yet polled is lost
    with the worker, and the test would then resume from an earlier epoch."""
    import tf_keras as keras

    from tests.fixtures.waiting import wait_until

    snapshot = Path(run_dir) / "checkpoint_manager_snapshot.json"

    def registered() -> bool:
        try:
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
        except (OSError, ValueError):  # not written yet, or being rewritten
            return False
        return latest.get("metrics", {}).get("epoch", -1) >= at_epoch - 1

    class Kill(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if rank == victim and epoch == at_epoch and not os.path.exists(marker):
                wait_until(registered, what=f"epoch {at_epoch - 1}'s checkpoint registered", every_s=0.1)
                Path(marker).write_text("killed")
                os._exit(1)

    return [Kill()]


@pytest.mark.slow
@pytest.mark.parametrize("pretrained", [False, True], ids=["scratch", "pretrained-then-finetuned"])
def test_two_workers_train_and_export(ray_local, tiny_dogs, tmp_path, pretrained):
    """Also with a pretrained backbone (frozen, then its top layers fine-tuned with BatchNorm frozen):
    its checkpoints did not load at the export ("axes don't match array") after the whole run."""
    from core import registry
    from core.bundle import load_bundle
    from jobs.train_distributed import DistributedConfig, run_distributed

    cfg = smoke().replace(head_epochs=2, finetune_epochs=0, batch_size=8)
    if pretrained:
        weights = str(tmp_path / "backbone.h5")
        registry.get_spec("custom_cnn").builder((cfg.input_size, cfg.input_size, 3), None).save_weights(weights)
        cfg = cfg.replace(weights=weights, head_epochs=1, finetune_epochs=1, finetune_layers=3, freeze_bn=True)
    dist = DistributedConfig(workers=2, storage=str(tmp_path / "ray"), run_name="two")
    result = run_distributed(cfg, str(tiny_dogs), dist, out=str(tmp_path / "bundle"))

    assert result.metrics["epoch"] in (0, 1)
    bundle = load_bundle(str(tmp_path / "bundle"))
    assert [b.name for b in bundle.classes] == [b.name for b in result.bundle.classes]
    assert len(bundle.classes) == 3
    assert bundle.card["training"]["distributed"] is True
    assert bundle.card["distributed"]["workers"] == 2
    assert 0.0 <= bundle.card["metrics"]["top1"] <= 1.0


@pytest.mark.slow
def test_killed_worker_resumes_from_checkpoint(ray_local, tiny_dogs, tmp_path):
    from jobs.train_distributed import DistributedConfig, run_distributed

    marker = tmp_path / "killed"
    cfg = smoke().replace(head_epochs=4, finetune_epochs=0, batch_size=8, early_stopping_patience=10)
    dist = DistributedConfig(workers=2, storage=str(tmp_path / "ray"), run_name="kill", max_failures=2)
    killer = functools.partial(_kill_once, marker=str(marker), at_epoch=2, victim=1,
                               run_dir=str(tmp_path / "ray" / "kill"))
    result = run_distributed(cfg, str(tiny_dogs), dist, worker_callbacks=killer)

    assert marker.exists(), "the victim worker never ran epoch 2"
    # The restarted group started at epoch 2 (after the epoch-1 checkpoint), not from zero.
    assert result.last_metrics["resumed_at"] == 2
    assert result.last_metrics["epoch"] == 3
    state = json.loads((Path(result.checkpoint_path) / "state.json").read_text())
    assert state["phase"] == "head"


@pytest.mark.slow
def test_cli_prints_our_progress_not_the_workers_output(tiny_dogs, tmp_path):
    """`breedlabel train --workers 2` as a user runs it: one line per epoch from the driver and the
    summary; the workers' TensorFlow start-up, per-step "Collective all_reduce" and Ray Train
    report lines stay in Ray's logs (-v shows them)."""
    import subprocess
    import sys

    from tests.test_train_cli import foreign_lines

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "train", "--data", str(tiny_dogs), "--out",
                           str(tmp_path / "bundle"), "--preset", "smoke", "--workers", "2", "--storage",
                           str(tmp_path / "ray"), "--epochs", "2", "--finetune-epochs", "0", "--batch-size", "8"],
                          cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert foreign_lines(proc.stderr) == [], proc.stderr[-4000:]
    assert "epoch 1 (head 1/2): val_top1 " in proc.stderr and "epoch 2 (head 2/2): " in proc.stderr
    assert json.loads(proc.stdout)["workers"] == 2


def test_a_stop_offers_resume_only_where_a_checkpoint_was_saved(tmp_path):
    """The stop line says "resume from its last checkpoint" only when the run folder holds one:
    Ray Train's snapshot file beside them does not count, nor a run folder that was never made."""
    from jobs.train_distributed import DistributedConfig, _saved_a_checkpoint

    dist = DistributedConfig(storage=str(tmp_path), run_name="r1")
    assert not _saved_a_checkpoint(dist)
    (tmp_path / "r1").mkdir()
    (tmp_path / "r1" / "checkpoint_manager_snapshot.json").write_text("{}")
    assert not _saved_a_checkpoint(dist)
    (tmp_path / "r1" / "checkpoint_2026-12-05_13-00-00.000000").mkdir()
    assert _saved_a_checkpoint(dist)


def _all_trainable(model) -> list:
    for layer in model._flatten_layers():
        layer.trainable = True
    return model.get_weights()


@pytest.mark.parametrize("weights,phase", [(None, "finetune"), ("pretrained.h5", "head"),
                                           ("pretrained.h5", "finetune")],
                         ids=["scratch-finetune", "pretrained-head", "pretrained-finetune"])
def test_a_checkpoint_of_any_phase_loads_into_a_fresh_model(tmp_path, weights, phase):
    """A checkpoint lists the backbone's weights trainable ones first: one saved while part of the
    backbone (and its BatchNorm) was frozen did not load into the freshly built model the export
    and a resume use ("axes don't match array" once training had kept a fine-tune epoch)."""
    import numpy as np

    from core.train_model import build_model, load_phase_weights, set_trainable

    cfg = smoke().replace(weights=weights, finetune_layers=3, freeze_bn=True)  # trainability follows cfg.weights
    saved = build_model(cfg.replace(weights=None), 3)
    set_trainable(saved, cfg, phase)
    saved.set_weights([np.full(w.shape, i, w.dtype) for i, w in enumerate(saved.get_weights())])  # crossing shows
    saved.save_weights(str(tmp_path / "weights.h5"))

    fresh = build_model(cfg.replace(weights=None), 3)
    load_phase_weights(fresh, cfg, phase, str(tmp_path / "weights.h5"))
    for got, want in zip(_all_trainable(fresh), _all_trainable(saved), strict=True):
        np.testing.assert_array_equal(got, want)


def test_export_reads_a_fine_tune_checkpoint(tiny_dogs, tmp_path):
    """The driver exports the best reported checkpoint; one from the fine-tune phase (partly frozen
    backbone, frozen BatchNorm) failed to load there, after the whole training had run."""
    import ray.train

    from core.bundle import load_bundle
    from core.train_model import build_model, set_trainable
    from jobs.train_distributed import STATE_FILE, WEIGHTS_FILE, DistributedConfig, export_checkpoint

    cfg = smoke().replace(finetune_layers=3, freeze_bn=True, dog_score=False, calibrate=False)
    model = build_model(cfg, 3)
    set_trainable(model, cfg, "finetune")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    model.save_weights(str(ckpt / WEIGHTS_FILE))
    (ckpt / STATE_FILE).write_text(json.dumps({"phase": "finetune", "phase_epoch": 0, "epoch": 1}))

    bundle, _ = export_checkpoint(ray.train.Checkpoint.from_directory(str(ckpt)), cfg, str(tiny_dogs),
                                  str(tmp_path / "bundle"), DistributedConfig(workers=1))
    assert load_bundle(str(tmp_path / "bundle")).card["training"]["distributed"] is True
    assert len(bundle.classes) == 3
