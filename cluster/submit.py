"""Submit breedlabel jobs to a Ray cluster's job API, follow them, and turn the end into an exit code.

A thin layer over `ray.job_submission.JobSubmissionClient` (the same API as `ray job submit`).
What it adds is what a scheduler needs: the job's entrypoint is `python -m jobs.<kind> …`
(a label job holds its output's lease itself, so two runs on one output never overlap), the
job's metadata records what it writes, and the exit code comes from the label run's manifest,
not from Ray's status alone (DESIGN.md: Ray can report SUCCEEDED for a run that did not finish).

Exit codes: 0 done; 3 done but the error rate exceeded --max-error-rate; 75 skipped (another
run holds the output's lease); 2 usage error in the job's options; 1 anything else (failed,
stopped, no manifest).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import re
import shlex
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence, TextIO

from cluster.address import check_reachable
from core import console, options
from core.errors import (EXIT_ERROR_BUDGET, EXIT_FAILED, EXIT_LEASE_HELD, EXIT_OK, EXIT_USAGE, ConfigError, JobError,
                         StorageError)
from core.label_config import LabelConfig
from core.output import (M_ERROR_RATE, M_EXIT_CODE, M_FINISHED_AT, M_IMAGES, M_LABELLED, M_MAX_ERROR_RATE, M_SKIPPED,
                         Output)
from core.stop import Stopped

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
ENTRYPOINT_MODULES: Mapping[str, str] = {"label": "jobs.label", "train": "jobs.train", "tune": "jobs.tune"}
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# job metadata keys: what `breedlabel jobs status` needs later to judge a finished job
META_KIND = "breedlabel_kind"
META_OUTPUT = "breedlabel_output"
POLL_S = 2.0
AGENT_WAIT_S = 120.0  # how long to retry a head whose job agent is starting or busy


def default_address() -> str:
    """The job API address: $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS when it is an http(s)://
    address or a GCS host:port (the job client finds the dashboard from it; replacing it with
    localhost's 8265 could submit to another cluster), else localhost."""
    for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        value = os.environ.get(name, "")
        if value.startswith(("http://", "https://")) or re.fullmatch(r"[\w.\-\[\]:]+:\d+", value):
            return value
    return DEFAULT_ADDRESS


@dataclass(frozen=True)
class JobRequest:
    """One job to submit. `job_args` are the job's own options, passed through unchanged."""

    kind: str
    job_args: tuple[str, ...]
    runtime_env: dict[str, Any]
    output: str | None = None       # label: the --out URI (its manifest tells how the job ended)
    submission_id: str | None = None
    entrypoint_num_cpus: float | None = None
    entrypoint_num_gpus: float | None = None


@dataclass(frozen=True)
class Outcome:
    exit_code: int
    status: str
    message: str
    manifest: dict | None = field(default=None, compare=False)


# The job's shell is a child of Ray's JobSupervisor worker, which the node's raylet started; the
# raylet's --python_worker_command names the interpreter Ray runs with there. So a head started as
# `/venv/bin/ray start` with the venv off PATH still runs the job with the venv's python, not a bare
# `python` that lacks breedlabel's dependencies. `python` where /proc cannot tell (not Linux).
RAY_PYTHON = ("PY=$(tr '\\000' '\\n' < /proc/$(awk '/^PPid:/ {print $2}' /proc/$PPID/status)/cmdline 2>/dev/null"
              " | sed -n 's/^--python_worker_command=\\([^ ]*\\).*/\\1/p'); exec \"${PY:-python}\"")


def build_entrypoint(req: JobRequest) -> str:
    """The shell command the job runs on the cluster: `python -m jobs.<kind> …` with the
    interpreter Ray runs on the node (RAY_PYTHON)."""
    if req.kind not in ENTRYPOINT_MODULES:
        raise ConfigError(f"unknown job {req.kind!r}; use one of {', '.join(ENTRYPOINT_MODULES)}")
    return f"{RAY_PYTHON} {shlex.join(['-m', ENTRYPOINT_MODULES[req.kind], *req.job_args])}"


def _shown_log(text: str) -> str:
    """A job's log with its "Running entrypoint" line as `shown_entrypoint` writes it."""
    return text.replace(f"{RAY_PYTHON} ", "python ")


def shown_entrypoint(entrypoint: str) -> str:
    """An entrypoint as a person reads it: `python -m jobs.label …` without the RAY_PYTHON lookup."""
    return "python " + entrypoint[len(RAY_PYTHON) + 1:] if entrypoint.startswith(RAY_PYTHON) else entrypoint


def connect(address: str):
    """A JobSubmissionClient, or a JobError saying how to reach the head."""
    from ray.job_submission import JobSubmissionClient

    from ray.exceptions import AuthenticationError, RpcError

    _enable_token_auth_if_available()
    if "://" not in address:  # a GCS host:port: the client's GCS connection retries ~40 s, then a traceback
        check_reachable(address, "--address")
    try:
        return JobSubmissionClient(address)
    except AuthenticationError as exc:
        raise _auth_error(address, exc) from None
    except (OSError, RuntimeError, ValueError, RpcError) as exc:  # requests' errors are OSErrors
        raise JobError(
            f"cannot reach the Ray job API at {address} ({exc}). Is the head up? For a cluster "
            "started with `ray up ray_cluster.yaml`, run `ray dashboard ray_cluster.yaml` to "
            "forward it to http://127.0.0.1:8265, or pass --address http://HEAD:8265") from exc


def _auth_error(where: str, exc: Exception) -> JobError:
    """The cluster wants a token (Ray 2.60's default) and none, or another, was sent. Ray's own advice
    (`ray get-auth-token --generate`, RAY_AUTH_MODE) is for starting a cluster, not joining one."""
    refused = "Invalid" if "invalid" in str(exc).lower() else "Missing"
    return JobError(f"{where}: the Ray job API refused the request ({refused.lower()} authentication token); "
                    "set RAY_AUTH_TOKEN to the cluster's token (`ray get-auth-token` on the head prints it) "
                    "or put it in ~/.ray/auth_token")


def _enable_token_auth_if_available() -> None:
    """Send the cluster's auth token when there is one, as `ray start` decides it.

    Ray 2.60 clusters use token authentication by default. The token comes from $RAY_AUTH_TOKEN,
    $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (`ray get-auth-token` prints it on the head); it
    is sent in a header, never logged. $RAY_AUTH_MODE, when set, wins.
    """
    try:
        from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available
    except ImportError:  # older/newer Ray without this helper: RAY_AUTH_MODE=token still works
        return
    # its "enabled for this Ray cluster" notice is meant for `ray start`
    with console.quiet_logger(maybe_enable_token_auth_if_token_available.__module__):
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def _call(what: str, fn, *args, **kwargs):
    from ray.exceptions import AuthenticationError

    try:
        return fn(*args, **kwargs)
    except AuthenticationError as exc:
        raise _auth_error(what, exc) from None
    except (RuntimeError, OSError) as exc:  # the SDK's HTTP errors / requests' connection errors
        if "status code 404" in str(exc) and "does not exist" in str(exc):
            raise JobError(f"{what}: no such job on this cluster; `breedlabel jobs list` shows its jobs") from None
        raise JobError(f"{what}: {exc}") from exc


def _transient(exc: BaseException) -> bool:
    """Worth retrying: the head's job agent is not up yet, or the connection dropped."""
    return isinstance(exc, OSError) or "No available agent" in str(exc)


# Ray's client-side chatter on every submit ("'.git' is now ignored by default", "Uploading package",
# "Ignoring upload to cluster for these files", "WebSocket closed … code 1000"): not notes for the
# person or cron log reading ours; `breedlabel -v` shows them.
_RAY_CLIENT_LOGGERS = ("ray._private.runtime_env.packaging", "ray._private.runtime_env.working_dir",
                       "ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk")


@contextlib.contextmanager
def _ray_client_quiet():
    with contextlib.ExitStack() as stack:
        for name in _RAY_CLIENT_LOGGERS:
            stack.enter_context(console.quiet_logger(name, enabled=not console.is_verbose()))
        yield


def submit(client, req: JobRequest) -> str:
    """Submit and return the submission id."""
    with _ray_client_quiet():
        return _submit(client, req)


def _submit(client, req: JobRequest) -> str:
    metadata = {META_KIND: req.kind}
    if req.output:
        metadata[META_OUTPUT] = req.output
    kwargs = dict(
        entrypoint=build_entrypoint(req), runtime_env=req.runtime_env, metadata=metadata,
        submission_id=req.submission_id or f"breedlabel-{req.kind}-{uuid.uuid4().hex[:12]}",
        entrypoint_num_cpus=req.entrypoint_num_cpus, entrypoint_num_gpus=req.entrypoint_num_gpus)
    deadline = time.monotonic() + AGENT_WAIT_S
    retried = False
    while True:
        try:
            return client.submit_job(**kwargs)
        except (RuntimeError, OSError) as exc:
            if "already" in str(exc) and kwargs["submission_id"] in str(exc):
                if req.submission_id is None or retried:
                    return kwargs["submission_id"]  # our earlier attempt got through; its reply was lost
                taken = req.submission_id
                raise ConfigError(f"--submission-id {taken}: a job with this id already exists on the cluster "
                                  f"(`breedlabel jobs status {taken}`); choose another id") from None
            if not _transient(exc) or time.monotonic() >= deadline:
                raise JobError(f"submitting the job: {exc}") from exc
            retried = True
            time.sleep(POLL_S)


_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_job_id(job_id: str, what: str = "job id") -> str:
    """A job id goes into the job API's URL path: `.`, `a/b` or `%2e` reached other routes (a
    traceback, raw HTTP 404/405 errors) instead of "no such job"."""
    if not _JOB_ID.fullmatch(job_id):
        raise ConfigError(f"{what} {job_id!r}: not a job id (letters, digits, '.', '_' and '-', starting with a "
                          "letter or digit); `breedlabel jobs list` shows the cluster's jobs")
    return job_id


def job_info(client, job_id: str):
    return _call(f"job {job_id}", client.get_job_info, job_id)


def follow_logs(client, job_id: str, out: TextIO | None = None, *, timeout_s: float | None = None) -> None:
    """Stream the job's output until it ends (the websocket closes at a terminal state), or for
    at most `timeout_s` (JobError then, as `wait`'s: the job keeps running). A job id the
    cluster does not know is a JobError, not an empty stream."""
    job_info(client, job_id)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    out = out or sys.stdout

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(_shown_log(chunk))
            out.flush()

    try:
        with _ray_client_quiet():
            asyncio.run(asyncio.wait_for(tail(), timeout_s))
    except Stopped:  # a signal: the caller's wait ends, not a stream failure
        raise
    except Exception as exc:  # noqa: BLE001 - any stream failure: wait() polls the status instead
        if deadline is not None and time.monotonic() >= deadline:
            status = status_of(job_info(client, job_id))
            if status not in TERMINAL:
                raise _still_running(job_id, status, timeout_s) from None
            return
        print(f"breedlabel: the log stream of job {job_id} ended early ({exc})", file=sys.stderr)


def wait(client, job_id: str, *, timeout_s: float | None = None, poll_s: float = POLL_S):
    """Block until the job reaches a terminal status; JobError on timeout (the job keeps running)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    failing_since = None
    while True:
        try:
            info = job_info(client, job_id)
            failing_since = None
        except JobError as exc:  # a long wait outlives a head that hiccups; give it AGENT_WAIT_S
            failing_since = failing_since or time.monotonic()
            if not _transient(exc.__cause__) or time.monotonic() - failing_since > AGENT_WAIT_S:
                raise
            time.sleep(poll_s)
            continue
        if status_of(info) in TERMINAL:
            return info
        if deadline is not None and time.monotonic() >= deadline:
            raise _still_running(job_id, status_of(info), timeout_s)
        time.sleep(poll_s)


def _still_running(job_id: str, status: str, timeout_s: float) -> JobError:
    return JobError(f"job {job_id} is still {status} after {timeout_s:.0f} s; it keeps running: "
                    f"`breedlabel jobs status {job_id}` or `breedlabel jobs stop {job_id}`")


def status_of(info) -> str:
    return getattr(info.status, "value", str(info.status))


def read_run_manifest(output: str, started_ms: int | None = None, ended_ms: int | None = None) -> dict | None:
    """The newest run manifest finished while the job ran (it held the output's lease, so no other
    run finished there meanwhile): from its start, and up to its end once it has ended, so a job
    asked about later is not judged by a later run on the same output.

    Why by finish time: a label run that resumes a crashed one keeps the older run id.
    """
    out = Output(output)
    floor = (started_ms or 0) / 1000 - 2.0
    ceiling = ended_ms / 1000 + 2.0 if ended_ms else float("inf")

    def during(m: dict) -> bool:
        return floor <= _epoch(m.get(M_FINISHED_AT)) <= ceiling

    last = out.last_run()  # every run that ends writes it; a run with nothing to label writes only it
    if last is not None and during(last):
        return last
    runs = [m for m in out.finished_runs() if during(m)]
    return max(runs, key=lambda m: _epoch(m.get(M_FINISHED_AT))) if runs else None


def _replaced_since(output: str, ended_ms: int | None) -> bool:
    """A later run on the output has rewritten the record a job with nothing to label leaves."""
    last = Output(output).last_run()
    return bool(ended_ms) and last is not None and _epoch(last.get(M_FINISHED_AT)) > ended_ms / 1000 + 2.0


def _epoch(value: Any) -> float:
    """Seconds since the epoch from a number or an ISO-8601 string; -inf when absent or odd."""
    import datetime as dt

    if isinstance(value, (int, float)):
        return float(value)
    try:
        parsed = dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return float("-inf")
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)).timestamp()


def outcome(info) -> Outcome:
    """Judge a finished job: the label run's manifest decides; Ray's status only for other jobs."""
    status, code = status_of(info), info.driver_exit_code
    meta = _label_metadata(info)
    if code == EXIT_LEASE_HELD:
        return Outcome(EXIT_LEASE_HELD, status, f"skipped: another run holds the lease of "
                       f"{meta.get(META_OUTPUT, 'the output')} (its holder is in the job's log)")
    if status == "STOPPED":
        how = _STOPPED_RESUME.get(meta.get(META_KIND, ""))
        if meta.get(META_KIND) == "label" and meta.get(META_OUTPUT):
            how = _stopped_label_resume(meta[META_OUTPUT])
        return Outcome(EXIT_FAILED, status, "stopped before it finished" + (f"; {how}" if how else ""))
    if meta.get(META_KIND) == "label" and meta.get(META_OUTPUT):
        return _label_outcome(status, code, meta, info.start_time, getattr(info, "end_time", None),
                              info.message or "")
    if status == "SUCCEEDED":
        return Outcome(EXIT_OK, status, "succeeded")
    return Outcome(code if code in (EXIT_USAGE, EXIT_ERROR_BUDGET) else EXIT_FAILED, status,
                   f"failed (exit code {code}): {_why_failed(info.message or '')}".strip())


_OUR_ERROR = re.compile(r"^breedlabel [\w-]+: error: ")


def _our_error_line(message: str) -> str | None:
    """The job's own last `breedlabel …: error:` line in Ray's message for a failed job, if any."""
    ours = [line for line in message.splitlines() if _OUR_ERROR.match(line)]
    return ours[-1] if ours else None


def _why_failed(message: str) -> str:
    """One line for a failed job: the job's own error line where its log has one, else the first
    line of Ray's message (which goes on with up to 20,000 characters of the log, printed above
    already as its tail)."""
    lines = message.strip().splitlines()
    return _our_error_line(message) or (lines[0] if lines else "")


# How each kind of job stopped (`jobs stop`) goes on: its own last line says it too, but `ray job
# stop` SIGKILLs the driver 3 s after SIGTERM, which a search's trials outlast
_STOPPED_RESUME = {
    "label": "anything it labelled is staged: submit the same job again to resume",
    "tune": "submit the same job again with --restore to resume the search",
    "train": "submit the same job again with the --storage and --run-name its log names to resume from its last "
             "checkpoint",
}


def _stopped_label_resume(output: str) -> str:
    """How a stopped label job goes on, from what its output holds: "what it labelled is staged" was
    said of a job stopped before it staged a row too (or whose rows a later run has since published)."""
    try:
        out = Output(output)
        staged = any(out.staged_parts(run_id) for run_id in out.staged_runs())
    except StorageError:  # not readable from here: what is true either way
        return _STOPPED_RESUME["label"]
    if staged:
        return f"rows are staged under {output}: submit the same job again to resume"
    return f"nothing is staged under {output}: submit the same job again to label what is left"


def _label_metadata(info) -> dict:
    """The job's metadata; for a label job submitted with plain `ray job submit` (no metadata), the
    output read from its entrypoint (`python -m jobs.label … --out URI`), so its manifest decides too."""
    meta = dict(info.metadata or {})
    if meta.get(META_KIND):
        return meta
    try:
        words = shlex.split(getattr(info, "entrypoint", "") or "")
    except ValueError:
        return meta
    starts = [i + 2 for i in range(len(words) - 1) if words[i:i + 2] == ["-m", ENTRYPOINT_MODULES["label"]]]
    if not starts:
        return meta
    parser = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    options.add_options(parser, LabelConfig)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            args, _ = parser.parse_known_args(words[starts[0]:])
    except (argparse.ArgumentError, SystemExit):  # its options do not parse: Ray's status alone
        return meta
    if args.out and not args.dry_run:
        meta.update({META_KIND: "label", META_OUTPUT: args.out})
    return meta


def _label_outcome(status: str, code: int | None, meta: Mapping[str, str], started_ms, ended_ms=None,
                   message: str = "") -> Outcome:
    output = meta[META_OUTPUT]
    ours = _our_error_line(message)
    if code == EXIT_USAGE:
        return Outcome(EXIT_USAGE, status, f"the label job rejected its options: {ours or 'see its log'}")
    if code not in (None, EXIT_OK, EXIT_ERROR_BUDGET):
        return Outcome(EXIT_FAILED, status, f"failed (exit code {code}): {ours or 'its log says why'}; nothing of "
                       "it is published; once that is fixed, a rerun of the same job resumes anything it staged")
    try:
        manifest = read_run_manifest(output, started_ms, ended_ms)
        replaced = manifest is None and code in (EXIT_OK, EXIT_ERROR_BUDGET) and _replaced_since(output, ended_ms)
    except StorageError as exc:
        return Outcome(EXIT_FAILED, status, f"Ray says {status}, but the run manifest cannot be read "
                       f"from here to confirm it: {exc}")
    if replaced:  # it had nothing to label (no manifest of its own) and a later run rewrote its record
        return Outcome(int(code), status, f"ended with exit code {code}; a later run on {output} has since "
                       "replaced its record, so its counts are in its log only")
    if manifest is None:
        return Outcome(EXIT_FAILED, status, f"Ray says {status}, but no run manifest under {output} is newer "
                       "than the job: the run did not finish (its rows are not published)")
    m_code = int(manifest.get(M_EXIT_CODE, EXIT_OK))
    counts = (f"{manifest.get(M_IMAGES, '?')} images, {manifest.get(M_LABELLED, '?')} labelled, "
              f"{manifest.get(M_SKIPPED, 0)} skipped as already labelled")
    if m_code == EXIT_ERROR_BUDGET:
        return Outcome(EXIT_ERROR_BUDGET, status, f"done, but the error rate {manifest.get(M_ERROR_RATE)} "
                       f"exceeded {manifest.get(M_MAX_ERROR_RATE)} ({counts}); all rows written", manifest)
    return Outcome(m_code, status, f"done: {counts}", manifest)


def running_label_jobs(client, output: str) -> list[str]:
    """Ids of the jobs on the cluster, not ended yet, that label `output` (submitted by breedlabel or
    with plain `ray job submit`)."""
    want = output.rstrip("/")
    return [job.submission_id or job.job_id for job in _call("listing jobs", client.list_jobs)
            if status_of(job) in ("PENDING", "RUNNING")
            and str(_label_metadata(job).get(META_OUTPUT, "")).rstrip("/") == want]


def stop(client, job_id: str) -> bool:
    return bool(_call(f"stopping job {job_id}", client.stop_job, job_id))


def logs(client, job_id: str) -> str:
    return _shown_log(_call(f"logs of job {job_id}", client.get_job_logs, job_id))


def list_rows(client) -> list[dict[str, str]]:
    """One row per job, newest first: id, status, kind, start time, entrypoint."""
    rows = []
    for job in _call("listing jobs", client.list_jobs):
        meta = job.metadata or {}
        start = job.start_time or 0
        rows.append({
            "id": job.submission_id or job.job_id or "-",
            "status": status_of(job),
            "kind": meta.get(META_KIND, "-"),
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(start / 1000)) if start else "-",
            "entrypoint": shown_entrypoint(job.entrypoint),
            "_start": start,
        })
    rows.sort(key=lambda r: r["_start"], reverse=True)
    return rows


def describe(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = [f"{'ID':40} {'STATUS':10} {'KIND':6} {'STARTED':19} ENTRYPOINT"]
    for r in rows:
        entry = r["entrypoint"] if len(r["entrypoint"]) <= 60 else r["entrypoint"][:57] + "..."
        lines.append(f"{r['id']:40} {r['status']:10} {r['kind']:6} {r['started']:19} {entry}")
    return "\n".join(lines)
