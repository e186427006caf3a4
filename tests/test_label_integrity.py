"""The output is a table users query blindly: exactly one row per (uri, member, content_sha256,
model_id) across finished runs, read by pandas, pyarrow (dataset with and without hive
partitioning, read_table) and DuckDB, after concurrent starts, SIGKILL at every phase,
SIGTERM/SIGINT, plain reruns and resumes. Every run is the real `python -m jobs.label` in a
process of its own (on the module's local Ray); crashes are placed by the code path
(tests/fixtures/crash.py), never by timing."""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from core import lease, output, storage
from core.errors import EXIT_FAILED, EXIT_LEASE_HELD, EXIT_OK
from tests.fixtures.crash import REPO, Point, job_env, label_command
from tests.fixtures.images import jpeg_bytes
from tests.fixtures.waiting import wait_until

N_IMAGES = 40
KEY = ["uri", "member", "content_sha256", "model_id"]
RUN_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for i in range(N_IMAGES):
        (folder / f"img{i:03d}.jpg").write_bytes(jpeg_bytes(32 + i % 7, 24 + i % 5, quality=70 + i % 20))
    (folder / "notes.jpg").write_bytes(b"not an image: an error row, counted like the others")
    return folder


def _args(photos: Path, bundle: Path, out: str, address: str, *extra: str) -> list[str]:
    return [str(photos), "--model", str(bundle), "--out", out, "--batch-size", "4", "--rows-per-file", "4",
            "--stage-every", "0", "--actors", "1", "--cpus-per-actor", "1", "--io-threads", "1", "--no-progress",
            "--address", address, *extra]


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                          **kwargs)


def _readers(out: str) -> dict[str, pd.DataFrame]:
    """The output folder as each common reader sees it (DuckDB on local folders: its S3 support
    is an extension it would download)."""
    fs, root = storage.get_filesystem(out)
    got = {
        "pandas": pd.read_parquet(root, filesystem=fs),
        "pyarrow.dataset": ds.dataset(root, filesystem=fs, format="parquet").to_table().to_pandas(),
        "pyarrow.dataset hive": ds.dataset(root, filesystem=fs, partitioning="hive").to_table().to_pandas(),
        "pq.read_table": pq.read_table(root, filesystem=fs).to_pandas(),
    }
    if not storage.is_s3(out):
        got["duckdb"] = duckdb.sql(f"select * from read_parquet('{root}/run_id=*/*.parquet')").df()
    return got


def assert_one_row_per_input(out: str, photos: Path) -> None:
    expected = sorted(str(p) for p in photos.iterdir())
    for reader, df in _readers(out).items():
        assert sorted(df.uri) == expected, f"{reader}: {len(df)} rows for {len(expected)} inputs"
        assert not df.duplicated(KEY).any(), reader


def _manifests(out: str) -> list[dict]:
    return output.Output(out).finished_runs()


@pytest.fixture
def out(request, tmp_path) -> str:
    if getattr(request, "param", "local") == "s3":
        return request.getfixturevalue("moto_s3").make_bucket(f"integrity-{os.getpid()}-{tmp_path.name[-20:]}"
                                                              .lower().replace("_", "-")) + "/labels"
    return str(tmp_path / "labels")


@pytest.fixture(scope="module")
def address(ray_local) -> str:
    return ray_local.address_info["address"]


@pytest.mark.slow
def test_plain_rerun_adds_no_row(photos, tiny_bundle, out, address):
    first = _run(label_command(_args(photos, tiny_bundle, out, address)))
    assert first.returncode == EXIT_OK, first.stderr[-3000:]
    again = _run(label_command(_args(photos, tiny_bundle, out, address)))
    assert again.returncode == EXIT_OK, again.stderr[-3000:]
    assert [m[output.M_IMAGES] for m in _manifests(out)] == [N_IMAGES + 1]  # the rerun published no folder
    last = output.Output(out).last_run()
    assert last[output.M_IMAGES] == 0 and last[output.M_SKIPPED] == N_IMAGES + 1
    assert_one_row_per_input(out, photos)
    assert not storage.exists(lease.lease_uri(out))


@pytest.mark.slow
def test_relabel_is_explicit_and_adds_a_row_per_input(photos, tiny_bundle, out, address):
    assert _run(label_command(_args(photos, tiny_bundle, out, address))).returncode == EXIT_OK
    assert _run(label_command(_args(photos, tiny_bundle, out, address, "--relabel"))).returncode == EXIT_OK
    df = pd.read_parquet(out)
    assert len(df) == 2 * (N_IMAGES + 1) and df.groupby(KEY).size().eq(2).all()  # one row per run, as documented


@pytest.mark.parametrize("out", ["local", "s3"], indirect=True)
@pytest.mark.slow
def test_a_second_run_while_one_writes_is_skipped(photos, tiny_bundle, out, address, tmp_path):
    """Run A pauses after staging its first part; B (same output) exits 75 naming A; A finishes."""
    marker, release = tmp_path / "paused", tmp_path / "go"
    cmd_a = label_command(_args(photos, tiny_bundle, out, address),
                          Point("core.output:Output.write_part", action="pause"), marker=marker, release=release)
    a = subprocess.Popen(cmd_a, cwd=REPO, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(marker, a)
        b = _run(label_command(_args(photos, tiny_bundle, out, address)))
        assert b.returncode == EXIT_LEASE_HELD, b.stderr[-3000:]
        assert "skipped" in b.stderr and "holds it until" in b.stderr and str(a.pid) in b.stderr
        release.touch()
        _, err = a.communicate(timeout=RUN_TIMEOUT_S)
        assert a.returncode == EXIT_OK, err[-3000:]
    finally:
        a.kill()
    assert len(_manifests(out)) == 1
    assert_one_row_per_input(out, photos)


@pytest.mark.slow
def test_simultaneous_starts_never_duplicate(photos, tiny_bundle, out, address):
    """No pause: whichever order the two runs take the lease in, the folder holds each input once."""
    procs = [subprocess.Popen(label_command(_args(photos, tiny_bundle, out, address)), cwd=REPO, env=job_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    codes = sorted(p.wait(timeout=RUN_TIMEOUT_S) for p in procs)
    assert codes in ([EXIT_OK, EXIT_OK], [EXIT_OK, EXIT_LEASE_HELD]), [p.stderr.read()[-2000:] for p in procs]
    assert_one_row_per_input(out, photos)


# Where a run can die, and what the next run must find: (point, expected published runs after the kill).
KILL_POINTS = {
    "listing": (Point("core.labelling:chunk_table", nth=2, when="before"), 0),
    "mid-batch": (Point("core.output:Output.write_part", nth=3), 0),
    "commit decided": (Point("core.output:Output._publish", when="before"), 0),
    "before lease release": (Point("core.lease:Lease.release", when="before"), 1),
}


@pytest.mark.parametrize("phase", list(KILL_POINTS))
@pytest.mark.slow
def test_sigkill_at_each_phase_then_rerun(phase, photos, tiny_bundle, out, address):
    point, published = KILL_POINTS[phase]
    killed = _run(label_command(_args(photos, tiny_bundle, out, address), point))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert len(_manifests(out)) == published
    if not published:  # nothing of the killed run is visible to any reader
        assert ds.dataset(out, format="parquet").count_rows() == 0
    rerun = _run(label_command(_args(photos, tiny_bundle, out, address)))
    assert rerun.returncode == EXIT_OK, rerun.stderr[-3000:]  # at once: the dead run's lease is taken over
    assert_one_row_per_input(out, photos)
    runs = _manifests(out)
    assert sum(m[output.M_IMAGES] for m in runs) == N_IMAGES + 1
    assert not output.Output(out).staged_runs()  # resumed or published: nothing left behind


@pytest.mark.slow
def test_sigkill_mid_publish_on_s3_is_rolled_forward(photos, tiny_bundle, moto_s3, address, tmp_path):
    """S3 publishes part by part: killed after copying the parts, before the run's manifest."""
    out = moto_s3.make_bucket(f"publish-{os.getpid()}") + "/labels"
    published_manifest = r"^(?!.*/_staging/).*/run_id=[^/]+/_manifest\.json$"
    point = Point("core.output:Output.write_json", when="before", match=published_manifest)
    killed = _run(label_command(_args(photos, tiny_bundle, out, address), point))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert _manifests(out) == []
    rerun = _run(label_command(_args(photos, tiny_bundle, out, address)))
    assert rerun.returncode == EXIT_OK, rerun.stderr[-3000:]
    assert "published run" in rerun.stderr  # the interrupted publish, rolled forward first
    assert [m[output.M_IMAGES] for m in _manifests(out)] == [N_IMAGES + 1]
    assert_one_row_per_input(out, photos)


@pytest.mark.parametrize("sig", ["term", "int"])
@pytest.mark.slow
def test_stop_signal_stages_releases_and_resumes(sig, photos, tiny_bundle, out, address):
    stopped = _run(label_command(_args(photos, tiny_bundle, out, address),
                                 Point("core.output:Output.write_part", nth=2, action=sig)))
    assert stopped.returncode == EXIT_FAILED, stopped.stderr[-3000:]
    last = stopped.stderr.strip().splitlines()[-1]
    name = {"term": "SIGTERM", "int": "SIGINT"}[sig]
    assert last.startswith(f"breedlabel label: error: stopped by {name}") and "rerun" in last, last
    assert "Traceback" not in stopped.stderr
    assert not storage.exists(lease.lease_uri(out))  # released: the next run need not wait
    staged = output.Output(out).staged_runs()
    assert len(staged) == 1 and len(output.Output(out).staged_parts(staged[0])) >= 2
    assert _manifests(out) == []
    rerun = _run(label_command(_args(photos, tiny_bundle, out, address)))
    assert rerun.returncode == EXIT_OK, rerun.stderr[-3000:]
    (manifest,) = _manifests(out)
    assert manifest[output.M_ATTEMPTS] == 2 and manifest[output.M_RESUMED] >= 8
    assert manifest[output.M_IMAGES] == N_IMAGES + 1
    assert_one_row_per_input(out, photos)


@pytest.mark.slow
def test_runtime_in_the_manifest_is_what_the_actors_ran(photos, tiny_bundle, out, address, tmp_path):
    """An actor whose OpenVINO cannot load falls back to TensorFlow: the driver says so once, and
    the manifest records TensorFlow, not the planned OpenVINO."""
    fake = tmp_path / "no_openvino" / "openvino"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('openvino removed for this test')\n")
    env = job_env({"PYTHONPATH": f"{fake.parent}{os.pathsep}{REPO}"})
    cmd = label_command(_args(photos, tiny_bundle, out, "local"))
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert done.returncode == EXIT_OK, done.stderr[-3000:]
    (manifest,) = _manifests(out)
    assert manifest[output.M_RUNTIME] == "tensorflow"
    assert manifest[output.M_RUNTIMES] == {"tensorflow": N_IMAGES}  # the error row ran no model
    assert done.stderr.count("runs TensorFlow instead of OpenVINO") == 1


def _wait_for(marker: Path, proc: subprocess.Popen) -> None:
    """Until the paused process reaches its pause point (it writes `marker`), or dies."""
    wait_until(marker.exists, what="at its pause point", timeout_s=RUN_TIMEOUT_S, every_s=0.1, proc=proc,
               describe=lambda: proc.stderr.read()[-3000:])
