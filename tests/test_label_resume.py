"""Crash and rerun: kill a `breedlabel label` process part way, check the folder shows nothing of
it, rerun the same command, and read the folder as a dataset: every input exactly once."""
from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.dataset as ds

from core import output
from tests.fixtures.images import jpeg_bytes

REPO = Path(__file__).resolve().parents[1]
N_IMAGES = 240


def _command(folder: Path, bundle: Path, out: Path, address: str) -> list[str]:
    return [sys.executable, "-m", "jobs.label", str(folder), "--model", str(bundle), "--out", str(out),
            "--batch-size", "4", "--rows-per-file", "8", "--actors", "1", "--cpus-per-actor", "1",
            "--io-threads", "1", "--no-progress", "--address", address]


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    return env


def test_killed_run_resumes_and_labels_each_input_once(ray_local, tmp_path, tiny_bundle):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(N_IMAGES):
        (folder / f"img{i:04d}.jpg").write_bytes(jpeg_bytes(32 + i % 7, 24 + i % 5, quality=70 + i % 20))
    out = tmp_path / "out"
    address = ray_local.address_info["address"]
    cmd = _command(folder, tiny_bundle, out, address)
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    staged: list[str] = []
    while time.monotonic() < deadline and proc.poll() is None:
        staged = glob.glob(str(out / "_staging" / "run_id=*" / "part-*.parquet"))
        if len(staged) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the job ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert len(staged) >= 2
    assert ds.dataset(str(out), format="parquet").count_rows() == 0  # nothing of the killed run is visible
    assert not glob.glob(str(out / "run_id=*"))

    done = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, timeout=400)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    df = pd.read_parquet(out)
    assert len(df) == N_IMAGES and df.uri.nunique() == N_IMAGES  # each input exactly once
    assert df.error.isna().all()
    (manifest_path,) = glob.glob(str(out / "run_id=*" / output.MANIFEST_FILE))
    manifest = json.loads(Path(manifest_path).read_text())
    assert manifest[output.M_ATTEMPTS] == 2 and 0 < manifest[output.M_RESUMED] < N_IMAGES
    assert manifest[output.M_IMAGES] == N_IMAGES and len(manifest[output.M_FILES]) == len(set(manifest[output.M_FILES]))
    assert sorted(os.path.basename(p) for p in glob.glob(str(out / "run_id=*" / "part-*.parquet"))) == \
        sorted(os.path.basename(f) for f in manifest[output.M_FILES])
