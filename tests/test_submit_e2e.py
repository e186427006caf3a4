"""End to end over HTTP: a real `ray start --head`, `breedlabel submit label` through its job API,
Parquet checked, the same incremental job again labels nothing new; then plain `ray job submit`
of the lease-holding entrypoint while a lease is held is skipped with exit code 75.

The head is the isolated `ray_head` fixture (own temp dir, free ports, own token; stopped by
pid, never `ray stop`), so this never touches another Ray instance on the machine.
"""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from core import lease as leases
from core.errors import EXIT_LEASE_HELD
from tests.fixtures.crash import Point, label_command
from tests.fixtures.images import jpeg_bytes, png_bytes

REPO = Path(__file__).resolve().parents[1]
JOB_TIMEOUT_S = 540
pytestmark = pytest.mark.slow


def _breedlabel(head, *args: str) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("breedlabel")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "jobs.cli"]
    return subprocess.run([*cmd, *args], cwd=REPO, env=head.env, capture_output=True, text=True,
                          timeout=JOB_TIMEOUT_S + 60)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    for i in range(10):
        (root / f"dog{i:02d}.jpg").write_bytes(jpeg_bytes(64 + 4 * i, 48))
    (root / "sub").mkdir()
    (root / "sub" / "pup.png").write_bytes(png_bytes(40, 40))
    (root / "broken.jpg").write_bytes(b"this is not an image")
    return root


def _submit_label(head, photos: Path, bundle: Path, out: Path) -> subprocess.CompletedProcess:
    return _breedlabel(head, "submit", "label", str(photos), "--model", str(bundle), "--out", str(out),
                       "--incremental", "--no-progress", "--address", head.address, "--wait",
                       "--wait-timeout", str(JOB_TIMEOUT_S))


def _finished_rows(out: Path):
    return pq.read_table(str(out))  # the folder as a dataset: finished runs only


def test_submit_label_then_incremental_then_skip(ray_head, photos, tiny_bundle, tmp_path):
    from core.output import M_IMAGES, M_LABELLED, M_SKIPPED, Output

    out = tmp_path / "labels"
    first = _submit_label(ray_head, photos, tiny_bundle, out)
    assert first.returncode == 0, f"{first.stdout}\n{first.stderr}"
    job_id = first.stdout.strip()  # the id alone on stdout: JOB=$(breedlabel submit …)
    assert job_id.startswith("breedlabel-label-") and "SUCCEEDED" in first.stderr
    # ours only: Ray's "'.git' is now ignored", "Uploading package", "Ignoring upload" lines came with every submit
    assert [line for line in first.stderr.splitlines() if not line.startswith("breedlabel submit: ")] == [], \
        first.stderr
    again = _breedlabel(ray_head, "submit", "label", str(photos), "--model", str(tiny_bundle), "--out",
                        str(tmp_path / "other"), "--address", ray_head.address, "--submission-id", job_id)
    assert again.returncode == 2 and again.stderr.strip() == (  # was a 30-line server traceback, exit 1
        f"breedlabel submit: error: --submission-id {job_id}: a job with this id already exists on the cluster "
        f"(`breedlabel jobs status {job_id}`); choose another id"), again.stderr

    rows = _finished_rows(out)
    expected = {str(p) for p in photos.rglob("*") if p.is_file()}
    uris = rows.column("uri").to_pylist()
    assert sorted(uris) == sorted(expected)  # every input exactly once
    errors = dict(zip(uris, rows.column("error").to_pylist()))
    breeds = dict(zip(uris, rows.column("breed").to_pylist()))
    assert errors.pop(str(photos / "broken.jpg")) is not None
    assert all(e is None for e in errors.values()) and all(breeds[u] for u in errors)

    status = _breedlabel(ray_head, "jobs", "status", job_id, "--address", ray_head.address)
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout, status.stderr
    listed = _breedlabel(ray_head, "jobs", "list", "--address", ray_head.address)
    assert job_id in listed.stdout
    logs = _breedlabel(ray_head, "jobs", "logs", job_id, "--address", ray_head.address)
    assert logs.returncode == 0 and logs.stdout.strip()

    second = _submit_label(ray_head, photos, tiny_bundle, out)
    assert second.returncode == 0, f"{second.stdout}\n{second.stderr}"
    assert "0 images" in second.stdout + second.stderr  # judged from the run's manifest (_last_run.json)
    assert len(Output(str(out)).finished_runs()) == 1  # nothing new: no second run folder
    last = Output(str(out)).last_run()
    assert last[M_LABELLED] == 0 and last[M_IMAGES] == 0 and last[M_SKIPPED] == len(expected)
    assert _finished_rows(out).num_rows == len(expected)  # nothing new labelled

    # A live lease on the output: plain `ray job submit` of the label job is skipped inside the
    # job (exit 75: the job takes the lease itself), and `breedlabel jobs status` reports the skip.
    holder = leases.acquire(str(out), "someone-else", ttl_s=600)
    try:
        ray_cli = Path(sys.executable).with_name("ray")
        skip = subprocess.run(
            [str(ray_cli) if ray_cli.exists() else shutil.which("ray"), "job", "submit",
             "--address", ray_head.address, "--working-dir", str(REPO), "--submission-id", "skip-check",
             "--metadata-json", f'{{"breedlabel_kind": "label", "breedlabel_output": "{out}"}}',
             "--", sys.executable, "-m", "jobs.label", str(photos), "--model", str(tiny_bundle), "--out", str(out)],
            cwd=REPO, env=ray_head.env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
        assert skip.returncode != 0
        assert "skipped" in skip.stdout + skip.stderr and "someone-else" in skip.stdout + skip.stderr
        status = _breedlabel(ray_head, "jobs", "status", "skip-check", "--address", ray_head.address)
        assert status.returncode == EXIT_LEASE_HELD, status.stdout + status.stderr
    finally:
        holder.release()
    assert len(Output(str(out)).finished_runs()) == 1


def test_jobs_stop_releases_the_lease_and_a_rerun_resumes(ray_head, photos, tiny_bundle, tmp_path):
    """`breedlabel jobs stop` on a running label job (paused by its code path after staging a part):
    the job stops within Ray's 3 s grace, stages what it has and releases the output's lease, so
    an immediate rerun is not skipped and resumes the run: every input once."""
    from core.output import M_ATTEMPTS, Output

    out, marker = tmp_path / "labels", tmp_path / "paused"
    args = [str(photos), "--model", str(tiny_bundle), "--out", str(out), "--batch-size", "2", "--stage-every", "0",
            "--no-progress"]
    cmd = label_command(args, Point("core.output:Output.write_part", action="pause"), marker=marker,
                        release=tmp_path / "never")
    ray_cli = Path(sys.executable).with_name("ray")
    submitted = subprocess.run(
        [str(ray_cli) if ray_cli.exists() else shutil.which("ray"), "job", "submit", "--no-wait",
         "--address", ray_head.address, "--working-dir", str(REPO), "--submission-id", "stop-me",
         "--metadata-json", f'{{"breedlabel_kind": "label", "breedlabel_output": "{out}"}}',
         "--", sys.executable, *cmd[1:]],
        cwd=REPO, env=ray_head.env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert submitted.returncode == 0, submitted.stderr
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not marker.exists():
        assert time.monotonic() < deadline, _breedlabel(ray_head, "jobs", "logs", "stop-me", "--address",
                                                        ray_head.address).stdout[-3000:]
        time.sleep(0.2)
    assert leases.read_lease(str(out)) is not None

    stop = _breedlabel(ray_head, "jobs", "stop", "stop-me", "--address", ray_head.address)
    assert stop.returncode == 0 and "STOPPED" in stop.stdout, stop.stdout + stop.stderr
    assert leases.read_lease(str(out)) is None  # released by the job itself, not left to expire
    logs = _breedlabel(ray_head, "jobs", "logs", "stop-me", "--address", ray_head.address).stdout
    assert "stopped by SIGTERM" in logs and "rerun the same command to resume" in logs, logs[-4000:]
    assert Output(str(out)).finished_runs() == [] and Output(str(out)).staged_runs()

    rerun = _submit_label(ray_head, photos, tiny_bundle, out)
    assert rerun.returncode == 0, f"{rerun.stdout}\n{rerun.stderr}"
    (manifest,) = Output(str(out)).finished_runs()
    assert manifest[M_ATTEMPTS] == 2
    uris = _finished_rows(out).column("uri").to_pylist()
    assert sorted(uris) == sorted(str(p) for p in photos.rglob("*") if p.is_file())


def test_the_job_api_refusing_or_a_wrong_address_is_one_line(ray_head, tmp_path):
    """A cluster with token auth (Ray 2.60's default) and no token, or a wrong one, ended every `jobs` and
    `submit` command in a traceback with Ray's advice for starting a cluster; the dashboard's host:port
    given without http:// (read by Ray as a GCS address) hung ~40 s, then a traceback."""
    no_token = {k: v for k, v in ray_head.env.items() if k != "RAY_AUTH_TOKEN"}
    cases = {
        "missing": dict(no_token, HOME=str(tmp_path)),
        "invalid": dict(no_token, HOME=str(tmp_path), RAY_AUTH_TOKEN="not-the-token"),
    }
    for refused, env in cases.items():
        done = subprocess.run([sys.executable, "-m", "jobs.cli", "jobs", "list", "--address", ray_head.address],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
        assert done.stderr.strip().splitlines() == [
            f"breedlabel jobs: error: {ray_head.address}: the Ray job API refused the request ({refused} "
            "authentication token); set RAY_AUTH_TOKEN to the cluster's token (`ray get-auth-token` on the head "
            "prints it) or put it in ~/.ray/auth_token"], done.stderr
    schemeless = ray_head.address.removeprefix("http://")
    done = subprocess.run([sys.executable, "-m", "jobs.cli", "jobs", "list", "--address", schemeless],
                          cwd=REPO, env=ray_head.env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1].startswith(
        f"breedlabel jobs: error: --address {schemeless}: something listens there, but not a Ray cluster"), done.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_a_stopped_wait_says_the_job_keeps_running(ray_head, photos, tiny_bundle, tmp_path, sig):
    """cron's `timeout` or a pod's deadline ends a `submit --wait`: it died by SIGTERM without a word
    (143), Ctrl-C said only "interrupted", and the cluster job, still running and holding the output's
    lease, was never mentioned. The job here cannot start (it asks for a GPU the head lacks): it waits."""
    script = Path(sys.executable).with_name("breedlabel")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "jobs.cli"]
    proc = subprocess.Popen([*cmd, "submit", "label", str(photos), "--model", str(tiny_bundle), "--out",
                             str(tmp_path / "o"), "--address", ray_head.address, "--entrypoint-num-gpus", "1",
                             "--wait"], cwd=REPO, env=ray_head.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    job_id = proc.stdout.readline().strip()
    assert job_id, proc.stderr.read()
    time.sleep(1)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    try:
        assert proc.returncode == 1, err
        assert err.strip().splitlines()[-1] == (
            f"breedlabel submit: error: stopped by {sig.name} while waiting; job {job_id} keeps running on the "
            f"cluster: `breedlabel jobs status {job_id}` follows it, `breedlabel jobs stop {job_id}` stops it"), err
        status = _breedlabel(ray_head, "jobs", "status", job_id, "--address", ray_head.address)
        assert "PENDING" in status.stdout + status.stderr, status.stdout + status.stderr
    finally:
        _breedlabel(ray_head, "jobs", "stop", job_id, "--address", ray_head.address)


def test_follow_keeps_to_the_wait_timeout_and_an_unknown_job_is_an_error(ray_head, photos, tiny_bundle, tmp_path):
    """`submit --follow --wait-timeout 5` streamed a job that could not start until someone killed it
    (the timeout bounded only the poll after the stream), and `jobs logs nosuch --follow` printed
    nothing and exited 0. The job here waits for a GPU the head lacks."""
    done = _breedlabel(ray_head, "submit", "label", str(photos), "--model", str(tiny_bundle), "--out",
                       str(tmp_path / "o"), "--address", ray_head.address, "--entrypoint-num-gpus", "1",
                       "--follow", "--wait-timeout", "5")
    job_id = done.stdout.strip()
    try:
        assert done.returncode == 1, done.stderr[-3000:]
        assert done.stderr.strip().splitlines()[-1] == (
            f"breedlabel submit: error: job {job_id} is still PENDING after 5 s; it keeps running: "
            f"`breedlabel jobs status {job_id}` or `breedlabel jobs stop {job_id}`"), done.stderr[-3000:]
    finally:
        _breedlabel(ray_head, "jobs", "stop", job_id, "--address", ray_head.address)
    for follow in ([], ["--follow"]):
        unknown = _breedlabel(ray_head, "jobs", "logs", "nosuch", *follow, "--address", ray_head.address)
        assert unknown.returncode == 1 and "Traceback" not in unknown.stderr, unknown.stderr[-3000:]
        assert unknown.stderr.strip().splitlines()[-1].endswith(
            "job nosuch: no such job on this cluster; `breedlabel jobs list` shows its jobs"), unknown.stderr


def _submit_from_another_host(head, *args: str) -> subprocess.CompletedProcess:
    """`breedlabel submit` as run on a machine other than the head (cron on a bastion): the lease's
    holder, recorded with the head's host name, cannot be looked up from there."""
    code = "import socket, sys; socket.gethostname = lambda: 'bastion'; from jobs.cli import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, "submit", *args], cwd=REPO, env=head.env,
                          capture_output=True, text=True, timeout=JOB_TIMEOUT_S + 60)


def _dead_holders_lease(out: Path) -> None:
    """The lease a label job SIGKILLed on the head leaves: unexpired, its process gone."""
    import psutil
    import socket

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    started = psutil.Process(gone.pid).create_time() if psutil.pid_exists(gone.pid) else time.time()
    gone.wait()
    now = time.time()
    out.mkdir(parents=True)
    (out / leases.LEASE_FILE).write_bytes(leases.LeaseInfo("ray@head", "killed-run", now, now + 600,
                                                           socket.gethostname(), gone.pid, started).to_bytes())


def test_a_submitter_elsewhere_asks_the_cluster_before_skipping_on_a_lease(ray_head, photos, tiny_bundle, tmp_path):
    """A job SIGKILLed on the head leaves its output's lease until it expires (10 min). A submitter on
    another host cannot see that the holder's process is gone and skipped (75) every scheduled run
    until then; now it asks the cluster: no job labels that output, so it submits, and the job, on
    the head, takes the output over. When a job on the cluster does label it, the skip names it."""
    out = tmp_path / "labels"
    _dead_holders_lease(out)
    run = _submit_from_another_host(ray_head, "label", str(photos), "--model", str(tiny_bundle), "--out", str(out),
                                    "--no-progress", "--address", ray_head.address, "--wait", "--wait-timeout",
                                    str(JOB_TIMEOUT_S))
    assert run.returncode == 0, run.stderr
    assert "but no job on this cluster labels it: submitting" in run.stderr and "SUCCEEDED" in run.stderr, run.stderr
    assert _finished_rows(out).num_rows == len([p for p in photos.rglob("*") if p.is_file()])
    assert leases.read_lease(str(out)) is None

    busy = tmp_path / "busy"  # a label job of `busy` waits on the cluster (it asks for a GPU the head lacks)
    pending = _breedlabel(ray_head, "submit", "label", str(photos), "--model", str(tiny_bundle), "--out", str(busy),
                          "--address", ray_head.address, "--entrypoint-num-gpus", "1")
    job_id = pending.stdout.strip()
    assert pending.returncode == 0 and job_id, pending.stderr
    try:
        _dead_holders_lease(busy)
        skip = _submit_from_another_host(ray_head, "label", str(photos), "--model", str(tiny_bundle), "--out",
                                         str(busy), "--address", ray_head.address, "--wait")
        assert skip.returncode == EXIT_LEASE_HELD, skip.stderr
        assert skip.stderr.startswith(f"breedlabel submit: skipped (job {job_id} on the cluster): "), skip.stderr
    finally:
        _breedlabel(ray_head, "jobs", "stop", job_id, "--address", ray_head.address)
