"""The output lease: one run at a time per output, expiry take-over, release; local and S3 (moto_server)."""
from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster import lease as leases
from cluster.lease import EXIT_LEASE_HELD, LeaseHeldError, LeaseLostError

REPO = Path(__file__).resolve().parents[1]


def _contend(output: str, run_id: str, barrier, results) -> None:
    barrier.wait()
    try:
        leases.acquire(output, run_id, ttl_s=60)
        results.put(run_id)
    except LeaseHeldError:
        results.put(None)


def test_local_concurrent_contenders_exactly_one_wins(tmp_path):
    ctx = multiprocessing.get_context("fork")
    n = 6
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_contend, args=(str(tmp_path / "out"), f"run{i}", barrier, results))
             for i in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=30)
    winners = [r for r in (results.get(timeout=5) for _ in procs) if r]
    assert len(winners) == 1
    assert leases.read_lease(str(tmp_path / "out")).run_id == winners[0]
    assert [p.name for p in (tmp_path / "out").iterdir()] == [leases.LEASE_FILE]  # no temp debris


@pytest.fixture(params=["local", "s3"])
def output_uri(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "labels")
    moto = request.getfixturevalue("moto_s3")
    return moto.make_bucket(f"lease-{os.getpid()}-{time.monotonic_ns() % 10**9}") + "/labels"


def test_second_contender_is_skipped_with_a_clear_message(output_uri):
    first = leases.acquire(output_uri, "run-a", ttl_s=300)
    with pytest.raises(LeaseHeldError) as info:
        leases.acquire(output_uri, "run-b", ttl_s=300)
    err = info.value
    assert err.exit_code == EXIT_LEASE_HELD == 75
    assert "run-a" in str(err) and "Skipping" in str(err) and leases.LEASE_FILE in str(err)
    first.release()
    assert leases.read_lease(output_uri) is None
    leases.acquire(output_uri, "run-c").release()  # free again after release


def test_expired_lease_is_taken_over_and_the_old_holder_loses_it(output_uri):
    t0 = time.time()
    old = leases.acquire(output_uri, "dead-run", ttl_s=10, clock=lambda: t0)
    # still live one second later
    with pytest.raises(LeaseHeldError):
        leases.acquire(output_uri, "early", ttl_s=10, clock=lambda: t0 + 1)
    new = leases.acquire(output_uri, "new-run", ttl_s=10, clock=lambda: t0 + 11)
    assert leases.read_lease(output_uri).run_id == "new-run"
    with pytest.raises(LeaseLostError):
        old.renew(10)  # the dead run woke up: it must not think it still holds the output
    old.release()      # does not delete the new holder's lease
    assert leases.read_lease(output_uri).run_id == "new-run"
    new.renew(10)
    new.release()
    assert leases.read_lease(output_uri) is None


def test_takeover_is_compare_and_swap(output_uri):
    """Two contenders that both saw the same expired lease: only the first swap succeeds."""
    t0 = time.time()
    leases.acquire(output_uri, "dead-run", ttl_s=1, clock=lambda: t0 - 100)
    backend = leases._backend(leases.lease_uri(output_uri))
    _, stale = backend.read()
    b = leases.LeaseInfo("b", "run-b", t0, t0 + 60).to_bytes()
    c = leases.LeaseInfo("c", "run-c", t0, t0 + 60).to_bytes()
    assert backend.replace(b, stale) is not None
    assert backend.replace(c, stale) is None
    assert backend.create(c) is None
    assert backend.delete(stale) is False
    assert leases.read_lease(output_uri).run_id == "run-b"


def test_held_renews_while_running(tmp_path):
    out = str(tmp_path / "out")
    with leases.held(out, "long-run", ttl_s=0.6) as lease:
        first_expiry = lease.info.expires_at
        time.sleep(1.0)
        current = leases.read_lease(out)
        assert current.run_id == "long-run" and current.expires_at > first_expiry
        assert not current.expired(time.time())
    assert leases.read_lease(out) is None


def _locked(out: str, *command: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cluster.locked", "--output", out, "--ttl", "60", "--", *command],
        cwd=REPO, capture_output=True, text=True, timeout=60)


def test_locked_entrypoint_runs_holds_and_releases(tmp_path):
    out = tmp_path / "out"
    probe = f"import os,sys; sys.exit(7 if os.path.exists({str(out / leases.LEASE_FILE)!r}) else 1)"
    proc = _locked(str(out), sys.executable, "-c", probe)
    assert proc.returncode == 7, proc.stderr  # the child's exit code, and the lease was there
    assert leases.read_lease(str(out)) is None


def test_locked_entrypoint_skips_when_held(tmp_path):
    out = str(tmp_path / "out")
    holder = leases.acquire(out, "scheduled-0900", ttl_s=300)
    marker = tmp_path / "ran"
    proc = _locked(out, sys.executable, "-c", f"open({str(marker)!r}, 'w')")
    assert proc.returncode == EXIT_LEASE_HELD
    assert "skipped" in proc.stderr and "scheduled-0900" in proc.stderr
    assert not marker.exists()
    holder.release()
