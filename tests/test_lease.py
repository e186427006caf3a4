"""The output lease: one run at a time per output, expiry take-over, release; local and S3 (moto_server)."""
from __future__ import annotations

import dataclasses
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core import lease as leases
from core.errors import EXIT_LEASE_HELD
from core.lease import LeaseHeldError, LeaseLostError
from tests.fixtures.waiting import wait_until

REPO = Path(__file__).resolve().parents[1]


def _contend(output: str, run_id: str, barrier, results) -> None:
    barrier.wait()
    try:
        leases.acquire(output, run_id, ttl_s=60)
        results.put(run_id)
    except LeaseHeldError:
        results.put(None)
    barrier.wait()  # the winner stays alive until all have tried: a dead holder's lease is free


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


def test_a_stalled_holder_confirms_its_lease_before_writing(output_uri):
    """A run frozen past its lease (a VM paused, SIGSTOP) woke up and staged one more part before
    its renewal thread found the lease taken over. `confirm()` before each write renews a lease
    that ran out by this process's clock, and so finds out first; a live lease costs no request."""
    now = [time.time()]
    stalled = leases.acquire(output_uri, "stalled", ttl_s=10, clock=lambda: now[0])
    token = stalled._token
    stalled.confirm(10)
    assert stalled._token == token  # live: nothing written
    now[0] += 11  # frozen past its lease, nobody took it: renewed
    stalled.confirm(10)
    assert stalled._token != token and leases.read_lease(output_uri).expires_at == now[0] + 10
    now[0] += 11  # frozen again, and another run took over meanwhile
    leases.acquire(output_uri, "taker", ttl_s=10, clock=lambda: now[0])
    with pytest.raises(LeaseLostError):
        stalled.confirm(10)
    assert stalled.lost and leases.read_lease(output_uri).run_id == "taker"


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
        # renewed every ttl/3: wait for two renewals, however slow the machine
        renewed = wait_until(lambda: (c := leases.read_lease(out)) and c.expires_at > first_expiry and c,
                             what="renewed once", every_s=0.05)
        again = wait_until(lambda: (c := leases.read_lease(out)) and c.expires_at > renewed.expires_at and c,
                           what="renewed twice", every_s=0.05)
        assert again.run_id == renewed.run_id == "long-run" and again.owner == lease.info.owner
    assert leases.read_lease(out) is None


def _held_by_a_process_that_dies(out: str) -> None:
    """A lease taken by another process, which is then SIGKILLed (as a killed label run is)."""
    code = f"from core import lease; lease.acquire({out!r}, 'killed-run', ttl_s=600); print('held', flush=True)"
    proc = subprocess.Popen([sys.executable, "-c", code + "; import time; time.sleep(600)"], cwd=REPO,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "held"
    proc.kill()
    proc.wait()


def test_a_dead_holder_on_this_host_is_taken_over_at_once(output_uri):
    """SIGKILL leaves the lease behind: a run on the same host sees its process is gone and takes
    over without waiting for the expiry (10 minutes by default)."""
    _held_by_a_process_that_dies(output_uri)
    held = leases.read_lease(output_uri)
    assert held.run_id == "killed-run" and not held.expired(time.time()) and leases.holder_gone(held)
    leases.acquire(output_uri, "next-run", ttl_s=60).release()


def test_a_holder_elsewhere_or_alive_is_waited_for(tmp_path):
    now = time.time()
    elsewhere = leases.LeaseInfo("u@other:1", "r", now, now + 60, host="other-host", pid=1, pid_started=1.0)
    assert not leases.holder_gone(elsewhere) and leases.is_live(elsewhere, now)  # only expiry tells there
    me = leases.acquire(str(tmp_path), "mine", ttl_s=60)
    assert not leases.holder_gone(me.info) and leases.is_live(me.info, time.time())
    reused = dataclasses.replace(me.info, pid_started=me.info.pid_started - 3600)  # same pid, another process
    assert leases.holder_gone(reused)
    me.release()


def test_an_output_that_is_a_file_is_named_as_such(tmp_path):
    """`--out` naming a file said "cannot use the lease file (File exists)", mkdir's errno."""
    from core.errors import StorageError

    (tmp_path / "labels").write_text("not a folder")
    with pytest.raises(StorageError, match=rf"^{tmp_path}/labels: a file, not a folder; the output must be a folder"):
        leases.acquire(str(tmp_path / "labels"), "run-a")


def test_an_s3_lease_without_credentials_says_so(monkeypatch):
    """`label --out s3://…` with no AWS credentials said the endpoint "does not answer
    (NoCredentialsError) … check the endpoint and network"; an input or --model said it right."""
    from core.errors import ServiceError
    from core.s3 import S3Options

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.delenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", raising=False)
    monkeypatch.delenv("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", raising=False)
    s3 = S3Options(endpoint_url="http://127.0.0.1:9", region="us-east-1", max_attempts=1)  # a client of its own
    with pytest.raises(ServiceError, match=r"^s3://bucket/out/_lease.json: no AWS credentials found; set "):
        leases.acquire("s3://bucket/out", "run-1", s3=s3)
