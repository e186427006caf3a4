"""SIGTERM (a scheduler, `breedlabel jobs stop`) and Ctrl-C on the Ray commands: `train --workers`
and `tune` end in one line and exit 1, with nothing exported; they died in Ray's C++ failure
handler (a stack dump, exit -6) or exited 1 without a word. Ray Train and Tune end their own fit
on SIGINT, so SIGTERM is handed to them as SIGINT and the stop is checked when the fit returns."""
from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import pytest

from tests.fixtures.crash import REPO, Point, job_env, train_command
from tests.fixtures.images import make_synthetic_dataset


def _stop_when(args: list[str], started: str, sig: int, tmp_path) -> subprocess.CompletedProcess:
    """Run `breedlabel ARGS`, send `sig` two seconds after a stderr line matching `started`."""
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", *args], cwd=REPO, text=True,
                            env=job_env({"BREEDLABEL_CACHE": str(tmp_path), "TF_CPP_MIN_LOG_LEVEL": "3"}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if re.search(started, line):
            break
    time.sleep(2)
    proc.send_signal(sig)
    out, rest = proc.communicate(timeout=240)
    return subprocess.CompletedProcess(args, proc.returncode, out, "".join(seen) + rest)


@pytest.mark.slow
@pytest.mark.parametrize("sig, reason", [(signal.SIGTERM, "stopped by SIGTERM"), (signal.SIGINT, "stopped by SIGINT")])
def test_distributed_training_stops_in_one_line(tmp_path, sig, reason):
    data = make_synthetic_dataset(tmp_path / "ds", num_classes=3, images_per_class=8, size=40)
    out = tmp_path / "b"
    proc = _stop_when(["train", "--workers", "2", "--data", str(data), "--out", str(out), "--preset", "smoke",
                       "--input-size", "32", "--head-epochs", "200", "--storage", str(tmp_path / "ray"),
                       "--run-name", "r1"],
                      r"epoch 1 \(head 1/200\)", sig, tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    ours = [line for line in proc.stderr.splitlines() if line.startswith("breedlabel")]
    assert ours == [f"breedlabel train: error: training {reason}, nothing exported; to resume from its last "
                    f"checkpoint, rerun with --storage {tmp_path / 'ray'} --run-name r1"], proc.stderr[-3000:]
    assert "SIGTERM received" not in proc.stderr and proc.stdout == "" and not (out / "card.json").exists()


@pytest.mark.slow
def test_a_search_stopped_by_sigterm_says_how_to_resume(tmp_path):
    data = make_synthetic_dataset(tmp_path / "ds", num_classes=3, images_per_class=8, size=40)
    state = tmp_path / "state"
    proc = _stop_when(["tune", "--data", str(data), "--out", str(tmp_path / "out"), "--preset", "smoke",
                       "--space", "smoke", "--num-samples", "4", "--storage", str(state)],
                      r"trial \w+ started \(1 of 4\)", signal.SIGTERM, tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    # said at once (`ray job stop` SIGKILLs the driver 3 s after its SIGTERM, before the trials end), then the result
    first, last = [line for line in proc.stderr.splitlines() if line.startswith("breedlabel")]
    assert re.fullmatch(rf"breedlabel tune: stopped by SIGTERM: ending the trials; resume it with the same options "
                        rf"plus --restore \(state in {re.escape(str(state))}/\S+\)", first), first
    assert re.fullmatch(rf"breedlabel tune: error: the search stopped after \d of 4 trials \(stopped by SIGTERM\); "
                        rf"resume it with the same options plus --restore \(state in {re.escape(str(state))}/\S+\)",
                        last), last
    assert "SIGTERM received" not in proc.stderr and proc.stdout == ""
    assert "Tuner.restore" not in proc.stderr and "Press CTRL+C" not in proc.stderr  # Tune's lines for Python users


@pytest.mark.slow
@pytest.mark.parametrize("point", [
    Point("core.console:import_tensorflow", when="before", action="term"),  # before Ray: was a silent 143
    Point("core.bundle:_save_serving_model", when="before", action="term"),  # after the fit: was ignored, rc 0
    Point("core.bundle:_save_serving_model", when="before", action="int"),
], ids=["term-at-start", "term-in-the-export", "int-in-the-export"])
def test_distributed_training_stopped_before_or_after_the_fit_exports_nothing(tmp_path, point):
    data = make_synthetic_dataset(tmp_path / "ds", num_classes=3, images_per_class=8, size=40)
    out = tmp_path / "b"
    proc = subprocess.run(train_command(["--workers", "2", "--data", str(data), "--out", str(out), "--preset", "smoke",
                                         "--input-size", "32", "--storage", str(tmp_path / "ray"), "--run-name", "r1"],
                                        point),
                          cwd=REPO, env=job_env({"BREEDLABEL_CACHE": str(tmp_path), "TF_CPP_MIN_LOG_LEVEL": "3"}),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    reason = "stopped by SIGTERM" if point.action == "term" else "stopped by SIGINT"
    ours = [line for line in proc.stderr.splitlines() if line.startswith("breedlabel")]
    if point.target == "core.console:import_tensorflow":  # no checkpoint yet: nothing to resume
        expected = (f"training {reason} before its first checkpoint, nothing exported; "
                    "rerun the command to start it again")
    else:
        expected = (f"training {reason}, nothing exported; to resume from its last checkpoint, rerun with "
                    f"--storage {tmp_path / 'ray'} --run-name r1")
    assert ours == [f"breedlabel train: error: {expected}"], proc.stderr[-3000:]
    assert proc.stdout == "" and not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("sig, why", [(signal.SIGTERM, "stopped by SIGTERM"), (signal.SIGINT, "stopped by SIGINT")])
def test_a_search_stopped_in_its_last_trial_is_not_a_success(tmp_path, sig, why):
    """Tune counts the trial it cut short as terminated: the search wrote its outputs and exited 0
    (SIGTERM), or said "no trial reported val_top1" (SIGINT), and Tune's "Failed to fetch metrics"
    lines came with it."""
    data = make_synthetic_dataset(tmp_path / "ds", num_classes=3, images_per_class=8, size=40)
    out, state = tmp_path / "out", tmp_path / "state"
    proc = _stop_when(["tune", "--data", str(data), "--out", str(out), "--preset", "smoke", "--space", "smoke",
                       "--num-samples", "1", "--storage", str(state)], r"trial \w+ started \(1 of 1\)", sig, tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    ours = [line for line in proc.stderr.splitlines() if line.startswith("breedlabel")]
    expected = (rf"breedlabel tune: error: the search stopped after 0 of 1 trials \({why}\); "
                r"resume it with the same options plus --restore \(state in .*\)")
    said_at_once = [f"breedlabel tune: {why}: ending the trials"] if sig == signal.SIGTERM else []
    assert [line.split(";")[0] for line in ours[:-1]] == said_at_once, proc.stderr[-3000:]
    assert re.fullmatch(expected, ours[-1]), proc.stderr[-3000:]
    assert "Failed to fetch metrics" not in proc.stderr and proc.stdout == ""
    assert not (out / "best_config.json").exists()
