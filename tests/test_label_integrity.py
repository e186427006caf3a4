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
import sys
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


@pytest.mark.parametrize("at", ["core.lease:Lease.release", "jobs.label:summary_text"], ids=["lease", "summary"])
@pytest.mark.slow
def test_a_stop_after_the_run_is_published_is_only_noted(at, photos, tiny_bundle, out, address):
    """A SIGTERM in the second after the publish (the lease's release, Ray's shutdown, the summary)
    killed the process: exit 143, no summary, no word, with the run published."""
    done = _run(label_command(_args(photos, tiny_bundle, out, address), Point(at, when="before", action="term")))
    assert done.returncode == EXIT_OK, done.stderr[-3000:]
    assert f"run {output.Output(out).last_run()[output.M_RUN_ID]}: {N_IMAGES + 1} images" in done.stderr
    assert done.stderr.strip().splitlines()[-1].endswith(" was already published"), done.stderr[-3000:]
    assert "stopped by SIGTERM as run" in done.stderr and "Traceback" not in done.stderr
    assert not storage.exists(lease.lease_uri(out))
    assert_one_row_per_input(out, photos)


# Inside `ray.init` of a run that starts its own Ray: before the head's processes start (Ray's own
# SIGTERM handler, sys.exit(15), is in place), while it connects to its GCS, and after the
# driver's core worker exists (its native failure handler dumped a C++ stack, aborting on SIGTERM).
RAY_START_POINTS = {
    "term-starting-the-head": Point("ray._private.node:Node.start_head_processes", when="before", action="term"),
    "term-after-the-driver-connects": Point("ray._private.worker:connect", action="term"),
    "int-after-the-driver-connects": Point("ray._private.worker:connect", action="int"),
    # Ray retries its GCS connection on any Exception, the Stopped raised there included
    "int-connecting-to-the-gcs": Point("ray._private.node:GcsClient", when="before", action="int"),
}


@pytest.mark.parametrize("where", list(RAY_START_POINTS))
@pytest.mark.slow
def test_a_stop_while_ray_starts_is_one_line_and_leaves_nothing_running(where, photos, tiny_bundle, out, tmp_path):
    """It exited 15 or 134 without a word, or (SIGINT) Ray printed the stop, started anyway and
    the run labelled a chunk before it stopped."""
    point = RAY_START_POINTS[where]
    marker = f"breedlabel-test-{os.getpid()}-{tmp_path.name}"
    stopped = subprocess.run(label_command(_args(photos, tiny_bundle, out, "local"), point), cwd=REPO,
                             env=job_env({"BREEDLABEL_TEST_MARKER": marker}), capture_output=True, text=True,
                             timeout=RUN_TIMEOUT_S)
    assert stopped.returncode == EXIT_FAILED, stopped.stderr[-3000:]
    name = "SIGINT" if point.action == "int" else "SIGTERM"
    lines = [line for line in stopped.stderr.splitlines() if "stopped by" in line]
    assert lines == [lines[-1]] and lines[-1].startswith(f"breedlabel label: error: stopped by {name}: 0 images")
    assert "Traceback" not in stopped.stderr and "*** SIGTERM received" not in stopped.stderr
    assert not storage.exists(lease.lease_uri(out)) and _manifests(out) == []
    wait_until(lambda: not _processes_with(marker), what="Ray's processes of the stopped run to exit",
               timeout_s=30, every_s=0.5, describe=lambda: str(_processes_with(marker)))


_SLOW_EXIT_AFTER_A_SIGTERM_IN_RAY_INIT = r"""
import os, signal, sys, time
import ray, ray._private.worker as worker
connect = worker.connect
def connect_then_sigterm(*a, **k):  # the driver's core worker exists: Ray's native handler gets it
    result = connect(*a, **k)
    os.kill(os.getpid(), signal.SIGTERM)
    return result
worker.connect = connect_then_sigterm
shutdown = ray.shutdown
def slow_shutdown(*a, **k):  # a loaded machine: the exit takes longer than the native handler's alarm (3 s)
    time.sleep(4)
    return shutdown(*a, **k)
ray.shutdown = slow_shutdown
from jobs.label import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_sigterm_in_ray_init_does_not_abort_the_exit(photos, tiny_bundle, out):
    """Ray's native failure handler logs a SIGTERM, passes it on and arms alarm(3) to abort: the
    run stopped with its one line, then died of SIGABRT (exit 134) when its exit took over 3 s."""
    stopped = _run([sys.executable, "-c", _SLOW_EXIT_AFTER_A_SIGTERM_IN_RAY_INIT,
                    *_args(photos, tiny_bundle, out, "local")])
    assert stopped.returncode == EXIT_FAILED, stopped.stderr[-3000:]
    assert stopped.stderr.strip().splitlines()[-1].startswith("breedlabel label: error: stopped by SIGTERM: 0 images")


@pytest.mark.slow
def test_a_second_ctrl_c_while_ray_shuts_down_is_ignored(photos, tiny_bundle, out, tmp_path):
    """Ray's shutdown at exit, cut by a second Ctrl-C, printed a traceback and left its agents running."""
    marker = f"breedlabel-test-{os.getpid()}-{tmp_path.name}"
    done = subprocess.run(label_command(_args(photos, tiny_bundle, out, "local"),
                                        Point("ray:shutdown", when="before", action="int")), cwd=REPO,
                          env=job_env({"BREEDLABEL_TEST_MARKER": marker}), capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S)
    assert done.returncode == EXIT_OK, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "KeyboardInterrupt" not in done.stderr
    assert_one_row_per_input(out, photos)
    wait_until(lambda: not _processes_with(marker), what="Ray's processes of the run to exit",
               timeout_s=30, every_s=0.5, describe=lambda: str(_processes_with(marker)))


def _processes_with(marker: str) -> list[str]:
    """Command lines of the processes whose environment carries `marker` (a run and all it started)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker.encode() in Path(f"/proc/{pid}/environ").read_bytes():
                found.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


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


@pytest.mark.slow
def test_a_cluster_with_no_room_for_the_actors_ends_in_one_line(photos, tiny_bundle, out, address):
    """A run that took over a frozen run's lease while that run's actor still held the CPUs waited
    30 minutes (Ray Data's no-progress timeout), then ended in Ray's ExecutionTimeoutError
    traceback. It ends in one line that says what is missing and what to do; the timeout is
    Ray's, shortened here to 5 s (RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S)."""
    import ray

    @ray.remote
    class Holder:
        def ping(self) -> int:
            return 1

    holder = Holder.options(num_cpus=int(ray.available_resources().get("CPU", 0))).remote()
    ray.get(holder.ping.remote())
    try:
        done = subprocess.run(label_command(_args(photos, tiny_bundle, out, address)), cwd=REPO,
                              env=job_env({"RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S": "5"}), capture_output=True,
                              text=True, timeout=RUN_TIMEOUT_S)
    finally:
        ray.kill(holder)
    assert done.returncode == EXIT_FAILED and "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("breedlabel label: error: run ") and "no progress for 5" in last, last
    assert "the 1 predict actor(s) their resources (1 CPU each)" in last and "rerun the same command" in last, last
    assert "waiting for room: a predict actor needs 1 CPU, and the cluster has 0 CPU free" in done.stderr, \
        done.stderr[-3000:]  # said at once, not after the timeout
    assert not storage.exists(lease.lease_uri(out))
    assert _run(label_command(_args(photos, tiny_bundle, out, address))).returncode == EXIT_OK  # room again
    assert_one_row_per_input(out, photos)
