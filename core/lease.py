"""A lease so two runs never write the same output at once (cron overlaps, two terminals, retries).

Every `breedlabel label` run holds its output's lease while it runs (core.label_run), whoever
started it: a terminal, cron, `ray job submit` or `breedlabel submit`. The lease is one small
JSON object next to the output, `<output>/_lease.json`, holding the owner (user, host, pid),
the run id and an expiry time. The holder renews it while it runs and deletes it when it ends,
also when it is stopped (SIGTERM/SIGINT). A run that died without deleting it (SIGKILL, a lost
node) stops renewing: its lease can be taken over once expired, or at once by a run on the
same host that sees the holder's process is gone. Every change is a compare-and-swap, so two
contenders never both win:

- S3: create with `If-None-Match: *`, renew/take over with `If-Match: <etag>`, release with a
  conditional delete (S3 and moto_server >= 5.x support all three).
- local paths: create by `link()` of a complete temp file (atomic, fails when it exists);
  take-over, renewal and release under `flock` on the output directory. Good on one machine;
  on a shared network file system whose locks are not reliable, use S3.

Expiry compares the holder's wall clock with the contender's: keep the TTL far above any
clock skew (minutes, not seconds). The file starts with `_`, so Parquet readers skip it.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import getpass
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace
from typing import Callable, Iterator

from core import storage
from core.errors import EXIT_LEASE_HELD, BreedlabelError, ServiceError, StorageError
from core.s3 import no_credentials

LEASE_FILE = "_lease.json"
DEFAULT_TTL_S = 600.0

log = logging.getLogger(__name__)
Clock = Callable[[], float]


class LeaseHeldError(BreedlabelError):
    """Another live run holds the output's lease: this run is skipped, not failed."""

    exit_code = EXIT_LEASE_HELD

    def __init__(self, uri: str, holder: "LeaseInfo | None", now: float):
        self.uri, self.holder = uri, holder
        if holder is None:
            detail = "another run took it at the same moment"
        else:
            left = max(0.0, holder.expires_at - now)
            detail = (f"run {holder.run_id} (owner {holder.owner}) holds it until "
                      f"{_utc(holder.expires_at)} ({left:.0f} s from now, renewed while it runs)")
        super().__init__(
            f"{uri}: the output is being written by another run: {detail}. Skipping this run; "
            f"try again after it finishes. If that run is dead, its lease expires by itself; "
            f"delete {uri} only if you are sure nothing is writing.")


class LeaseLostError(BreedlabelError):
    """Our lease was taken over (it expired: renewals failed or stalled); stop writing."""


@dataclass(frozen=True)
class LeaseInfo:
    owner: str
    run_id: str
    acquired_at: float
    expires_at: float
    host: str = ""              # where the holder runs, and its process: lets a run on the same
    pid: int = 0                # host take over at once from a holder that was SIGKILLed
    pid_started: float = 0.0    # the process's start time (a reused pid is another process)

    def expired(self, now: float) -> bool:
        return now >= self.expires_at

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "LeaseInfo | None":
        """None for an unreadable lease (treated as expired: writes are atomic, so it is debris)."""
        try:
            raw = json.loads(data)
            return cls(str(raw["owner"]), str(raw["run_id"]), float(raw["acquired_at"]),
                       float(raw["expires_at"]), str(raw.get("host", "")), int(raw.get("pid", 0)),
                       float(raw.get("pid_started", 0.0)))
        except (ValueError, KeyError, TypeError):
            return None


def _this_process() -> tuple[str, int, float]:
    import psutil

    return socket.gethostname(), os.getpid(), psutil.Process().create_time()


def held_on_this_host(holder: LeaseInfo) -> bool:
    """Whether the holder's process can be looked up from here (the same host, a recorded pid)."""
    return bool(holder.pid) and holder.host == socket.gethostname()


def holder_gone(holder: LeaseInfo) -> bool:
    """True only when we can tell for sure: same host, and its process is no longer there."""
    import psutil

    if not held_on_this_host(holder):
        return False  # another machine: only expiry tells
    try:
        return abs(psutil.Process(holder.pid).create_time() - holder.pid_started) > 1.0
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False


def is_live(holder: LeaseInfo | None, now: float) -> bool:
    """A lease that blocks other runs: readable, not expired, and its holder not known dead."""
    return holder is not None and not holder.expired(now) and not holder_gone(holder)


def default_owner() -> str:
    """Who holds it, for the humans reading a skip message: user@host:pid."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}:{os.getpid()}"


def lease_uri(output_uri: str) -> str:
    return storage.join(output_uri, LEASE_FILE)


def _utc(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


# --- backends: create / read / compare-and-swap replace / compare-and-delete ------------------

def _os_errors(method):
    """OS errors on the lease file become StorageErrors that name it."""
    @functools.wraps(method)
    def wrapper(self, *args):
        try:
            return method(self, *args)
        except OSError as exc:
            folder = os.path.dirname(self.path)
            if isinstance(exc, (FileExistsError, NotADirectoryError)) and os.path.exists(folder) \
                    and not os.path.isdir(folder):
                raise StorageError(f"{folder}: a file, not a folder; the output must be a folder (it is made if "
                                   "missing) or an s3:// prefix") from None
            raise StorageError(f"{self.path}: cannot use the lease file ({exc.strerror or exc}); "
                               "check that the output folder exists and is writable") from exc
    return wrapper


class _LocalBackend:
    def __init__(self, uri: str):
        self.path = storage.parse_uri(uri).path
        self.dir = os.path.dirname(self.path) or "."

    @staticmethod
    def _token(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing drops the lock

    def _write_temp(self, data: bytes) -> str:
        tmp = f"{self.path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    @_os_errors
    def create(self, data: bytes) -> str | None:
        os.makedirs(self.dir, exist_ok=True)
        tmp = self._write_temp(data)
        try:
            with self._locked():
                os.link(tmp, self.path)  # atomic; fails if a lease exists
            return self._token(data)
        except FileExistsError:
            return None
        finally:
            os.unlink(tmp)

    @_os_errors
    def read(self) -> tuple[bytes, str] | None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return data, self._token(data)

    @_os_errors
    def replace(self, data: bytes, token: str) -> str | None:
        tmp = self._write_temp(data)
        try:
            with self._locked():
                current = self.read()
                if current is None or current[1] != token:
                    return None
                os.replace(tmp, self.path)
                tmp = ""
            return self._token(data)
        finally:
            if tmp:
                os.unlink(tmp)

    @_os_errors
    def delete(self, token: str) -> bool:
        with self._locked():
            current = self.read()
            if current is None or current[1] != token:
                return False
            os.unlink(self.path)
            return True


class _S3Backend:
    def __init__(self, uri: str, s3: storage.S3Options | None = None):
        parsed = storage.parse_uri(uri)
        self.uri, self.bucket, self.key = uri, parsed.bucket, parsed.path
        self.s3 = (s3 or storage.S3Options()).resolved()
        self.client = storage.s3_client(self.s3)

    @staticmethod
    def _code(exc: Exception) -> str:
        return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))

    def _call(self, action: str, fn, **kwargs):
        """Run one S3 call; a failed precondition/conflict returns None, the rest StorageError."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        try:
            return fn(Bucket=self.bucket, Key=self.key, **kwargs)
        except ClientError as exc:
            code = self._code(exc)
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                return None
            if code in ("NoSuchKey", "404", "NotFound") and action in ("read", "delete"):
                return None
            raise StorageError(f"{self.uri}: cannot {action} the lease ({code or exc}); "
                               "check the bucket and the credentials' write access") from exc
        except NoCredentialsError:
            raise no_credentials(self.uri) from None
        except BotoCoreError as exc:
            raise ServiceError(f"{self.uri}: {self.s3.endpoint} does not answer ({type(exc).__name__}) "
                               f"to {action} the lease; check the endpoint and network") from exc

    def create(self, data: bytes) -> str | None:
        resp = self._call("create", self.client.put_object, Body=data, IfNoneMatch="*", ContentType="application/json")
        return resp["ETag"] if resp else None

    def read(self) -> tuple[bytes, str] | None:
        resp = self._call("read", self.client.get_object)
        return (resp["Body"].read(), resp["ETag"]) if resp else None

    def replace(self, data: bytes, token: str) -> str | None:
        resp = self._call("replace", self.client.put_object, Body=data, IfMatch=token, ContentType="application/json")
        return resp["ETag"] if resp else None

    def delete(self, token: str) -> bool:
        return self._call("delete", self.client.delete_object, IfMatch=token) is not None


def _backend(uri: str, s3: storage.S3Options | None = None):
    return _S3Backend(uri, s3) if storage.is_s3(uri) else _LocalBackend(uri)


# --- the lease ---------------------------------------------------------------------------------

class Lease:
    """An acquired lease: `renew()` while running, `release()` at the end."""

    def __init__(self, uri: str, info: LeaseInfo, token: str, backend, clock: Clock):
        self.uri, self.info, self._token, self._backend, self._clock = uri, info, token, backend, clock
        self._lock = threading.Lock()  # the renewal thread and the run both renew
        self.lost = False  # set when a renewal found the lease taken over: stop writing at once

    def renew(self, ttl_s: float, run_id: str | None = None) -> None:
        """Push the expiry out (and record the run id, once a resumed run's id is known)."""
        with self._lock:
            info = replace(self.info, run_id=run_id or self.info.run_id, expires_at=self._clock() + ttl_s)
            token = self._backend.replace(info.to_bytes(), self._token)
            if token is None:
                self.lost = True
                raise LeaseLostError(f"{self.uri}: lease of run {self.info.run_id} was taken over by "
                                     "another run after it expired; this run must stop writing")
            self.info, self._token = info, token

    def confirm(self, ttl_s: float) -> None:
        """Before a write: a lease that ran out by our own clock (this process stalled: a frozen VM,
        SIGSTOP, a long GC) may have been taken over while the renewal thread slept too, so renew
        it now, before writing (LeaseLostError if it was); otherwise nothing to do. The margin,
        a tenth of the TTL, covers clock skew between hosts."""
        if self.lost:
            raise LeaseLostError(f"{self.uri}: lease of run {self.info.run_id} was taken over by another run "
                                 "after it expired; this run must stop writing")
        if self._clock() >= self.info.expires_at - ttl_s / 10:
            self.renew(ttl_s)

    def release(self) -> None:
        with self._lock:
            if not self._backend.delete(self._token):
                log.warning("%s: not released: it is no longer ours (taken over after expiry)", self.uri)


def read_lease(output_uri: str, s3: storage.S3Options | None = None) -> LeaseInfo | None:
    """The current lease of an output, or None (no lease, or an unreadable one)."""
    current = _backend(lease_uri(output_uri), s3).read()
    return LeaseInfo.from_bytes(current[0]) if current else None


def acquire(output_uri: str, run_id: str, *, ttl_s: float = DEFAULT_TTL_S,
            owner: str | None = None, clock: Clock = time.time, s3: storage.S3Options | None = None) -> Lease:
    """Take the output's lease, or take over an expired one; LeaseHeldError if it is live."""
    uri = lease_uri(output_uri)
    backend = _backend(uri, s3)
    now = clock()
    host, pid, started = _this_process()
    info = LeaseInfo(owner or default_owner(), run_id, now, now + ttl_s, host, pid, started)
    for _ in range(3):  # a lease released between our create and read: try again
        token = backend.create(info.to_bytes())
        if token is not None:
            return Lease(uri, info, token, backend, clock)
        current = backend.read()
        if current is None:
            continue
        holder = LeaseInfo.from_bytes(current[0])
        if is_live(holder, now):
            raise LeaseHeldError(uri, holder, now)
        token = backend.replace(info.to_bytes(), current[1])
        if token is None:
            raise LeaseHeldError(uri, read_lease(output_uri, s3), now)
        why = "unreadable" if holder is None else (
            f"expired {_utc(holder.expires_at)}" if holder.expired(now) else "its process is gone")
        log.warning("%s: took over the lease of run %s (owner %s): %s", uri,
                    holder.run_id if holder else "?", holder.owner if holder else "?", why)
        return Lease(uri, info, token, backend, clock)
    raise LeaseHeldError(uri, read_lease(output_uri, s3), now)


@contextlib.contextmanager
def held(output_uri: str, run_id: str, *, ttl_s: float = DEFAULT_TTL_S,
         on_lost: Callable[[LeaseLostError], None] | None = None,
         s3: storage.S3Options | None = None) -> Iterator[Lease]:
    """Hold the lease for the body, renewing it every ttl/3 in a daemon thread; release at exit.

    `on_lost` is called (from the renewal thread) if the lease is lost, e.g. to stop the job.
    """
    lease = acquire(output_uri, run_id, ttl_s=ttl_s, s3=s3)
    stop = threading.Event()

    def renew_loop() -> None:
        while not stop.wait(ttl_s / 3):
            try:
                lease.renew(ttl_s)
            except LeaseLostError as exc:
                log.error("%s", exc)
                if on_lost:
                    on_lost(exc)
                return
            except StorageError as exc:  # transient: keep trying until the lease runs out
                log.warning("%s: renewal failed, will retry: %s", lease.uri, exc)

    thread = threading.Thread(target=renew_loop, name="lease-renewal", daemon=True)
    thread.start()
    try:
        yield lease
    finally:
        stop.set()
        thread.join(timeout=5)
        try:
            lease.release()
        except StorageError as exc:  # never hide why the run ended; an unreleased lease expires (or is taken
            log.warning("%s: could not release the lease: %s", lease.uri, exc)  # over at once on this host)
