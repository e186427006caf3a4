"""Crash and rerun: kill a `breedlabel label` process part way, check the folder shows nothing of
it, rerun the same command, and read the folder as a dataset: every input exactly once.

The first run SIGKILLs itself right after staging its second part. Killing it from outside when
two parts appear is a race: with a tiny model the driver writes all its parts in one burst of
~40 ms once the actor is up (measured), so a poll from the test often saw them all staged."""
from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.dataset as ds
import pytest

from core import output
from tests.fixtures.images import jpeg_bytes

REPO = Path(__file__).resolve().parents[1]
N_IMAGES = 240
KILL_AFTER_PARTS = 2
ROWS_PER_FILE = 8
# The real job, SIGKILLed by its own writer once it has staged KILL_AFTER_PARTS parts.
_DIE_AFTER_PARTS = f"""
import itertools, os, signal, sys
import pytest
from core import output
write, written = output.Output.write_part, itertools.count(1)
def write_then_die(self, *args, **kwargs):
    path = write(self, *args, **kwargs)
    if next(written) == {KILL_AFTER_PARTS}:
        os.kill(os.getpid(), signal.SIGKILL)
    return path
output.Output.write_part = write_then_die
from jobs.label import main
sys.exit(main(sys.argv[1:]))
"""


def _command(folder: Path, bundle: Path, out: Path, address: str, *, die: bool = False) -> list[str]:
    entry = ["-c", _DIE_AFTER_PARTS] if die else ["-m", "jobs.label"]
    return [sys.executable, *entry, str(folder), "--model", str(bundle), "--out", str(out),
            "--batch-size", "4", "--rows-per-file", str(ROWS_PER_FILE), "--actors", "1", "--cpus-per-actor", "1",
            "--io-threads", "1", "--no-progress", "--address", address]


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.mark.slow
def test_killed_run_resumes_and_labels_each_input_once(ray_local, tmp_path, tiny_bundle):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(N_IMAGES):
        (folder / f"img{i:04d}.jpg").write_bytes(jpeg_bytes(32 + i % 7, 24 + i % 5, quality=70 + i % 20))
    out = tmp_path / "out"
    address = ray_local.address_info["address"]
    killed = subprocess.run(_command(folder, tiny_bundle, out, address, die=True), cwd=REPO, env=_env(),
                            capture_output=True, timeout=400)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-3000:]
    staged = glob.glob(str(out / "_staging" / "run_id=*" / "part-*.parquet"))
    assert len(staged) == KILL_AFTER_PARTS
    assert ds.dataset(str(out), format="parquet").count_rows() == 0  # nothing of the killed run is visible
    assert not glob.glob(str(out / "run_id=*"))

    cmd = _command(folder, tiny_bundle, out, address)
    done = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, timeout=400)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    df = pd.read_parquet(out)
    assert len(df) == N_IMAGES and df.uri.nunique() == N_IMAGES  # each input exactly once
    assert df.error.isna().all()
    (manifest_path,) = glob.glob(str(out / "run_id=*" / output.MANIFEST_FILE))
    manifest = json.loads(Path(manifest_path).read_text())
    assert manifest[output.M_ATTEMPTS] == 2 and manifest[output.M_RESUMED] == KILL_AFTER_PARTS * ROWS_PER_FILE
    assert manifest[output.M_IMAGES] == N_IMAGES and len(manifest[output.M_FILES]) == len(set(manifest[output.M_FILES]))
    assert sorted(os.path.basename(p) for p in glob.glob(str(out / "run_id=*" / "part-*.parquet"))) == \
        sorted(os.path.basename(f) for f in manifest[output.M_FILES])
