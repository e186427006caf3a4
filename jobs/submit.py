"""Submit a label, train or tune job to a Ray cluster through its job API.

    breedlabel submit label s3://b/photos/ --model s3://b/bundles/m --out s3://b/labels/ \\
        --incremental --address http://127.0.0.1:8265 --wait

Everything that is not one of the options below is the job's own arguments, exactly as for
`breedlabel label|train|tune` (put them after `--` if one clashes with a submit option). The
options are checked here with the job's own parser before anything is sent. Paths must be
absolute or URIs: the job runs in its own working directory on the cluster.

Prints the submission id on stdout and nothing else there (`JOB=$(breedlabel submit …)`); the
job's status, its streamed log (--follow) and every note go to stderr. Without --wait the exit
code only says whether the job was accepted; with --wait (or --follow) it is the job's: 0 done,
3 done but over the error budget, 75 skipped (another run holds the output's lease), 2 bad job
options, 1 failed/stopped.
A label job counts as done only if its run manifest is there (read from the output URI, so
the submitter needs read access to it).
"""
from __future__ import annotations

import argparse
import functools
import importlib
import os
import sys
import time
from typing import Any, Callable, Sequence

from cluster import runtime_env
from cluster import submit as cluster_submit
from core import lease as leases
from core import options
from core.errors import EXIT_LEASE_HELD, EXIT_OK, EXIT_USAGE, BreedlabelError, ConfigError
from core.label_config import LabelConfig
from core.stop import GracefulStop, Stopped
from jobs import ray_session

LOG_TAIL_LINES = 40


def add_submit_options(parser: argparse.ArgumentParser, defaults: bool = True) -> None:
    """Submit's own options (shared with the pass-through extraction parser)."""
    d = (lambda v: v) if defaults else (lambda v: argparse.SUPPRESS)
    parser.add_argument("--address", default=d(cluster_submit.default_address()),
                        help="Ray job API (dashboard) address; $RAY_ADDRESS if it is http(s)://")
    parser.add_argument("--wait", action="store_true", default=d(False),
                        help="wait for the end; exit with the job's code")
    parser.add_argument("--follow", action="store_true", default=d(False),
                        help="stream the job's log while waiting (implies --wait)")
    parser.add_argument("--wait-timeout", type=float, default=d(None), metavar="S",
                        help="give up waiting after S seconds (the job keeps running)")
    parser.add_argument("--runtime-env", choices=runtime_env.MODES, default=d(runtime_env.DEFAULT_MODE),
                        help="how code and dependencies reach the nodes (see cluster/runtime_env.py)")
    parser.add_argument("--working-dir", default=d(None), metavar="DIR",
                        help="code to upload (default: this breedlabel checkout)")
    parser.add_argument("--env", action="append", default=d([]), metavar="NAME=VALUE",
                        help="extra environment variable for the job (never credentials)")
    parser.add_argument("--submission-id", default=d(None), help="job id to use (default: generated)")
    parser.add_argument("--entrypoint-num-cpus", type=float, default=d(None), help="CPUs reserved for the job's driver")
    parser.add_argument("--entrypoint-num-gpus", type=float, default=d(None), help="GPUs reserved for the job's driver")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", choices=list(cluster_submit.ENTRYPOINT_MODULES), help="which job to run")
    add_submit_options(parser)
    parser.add_argument("job_args", nargs=argparse.REMAINDER, metavar="JOB_ARGS",
                        help="the job's own arguments (as for `breedlabel JOB`)")


def split_args(args: argparse.Namespace) -> list[str]:
    """Pull submit's options out of the pass-through arguments; return the job's arguments."""
    rest = list(args.job_args)
    cut = rest.index("--") if "--" in rest else len(rest)
    extractor = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_submit_options(extractor, defaults=False)
    found, job_args = extractor.parse_known_args(rest[:cut])
    for name, value in vars(found).items():
        if name == "env":
            value = [*args.env, *value]
        setattr(args, name, value)
    return job_args + rest[cut + 1:]


def _job_namespace(kind: str, job_args: list[str]) -> argparse.Namespace:
    """Parse the job's arguments with the job's own parser (usage errors before submitting)."""
    module = importlib.import_module(cluster_submit.ENTRYPOINT_MODULES[kind])
    parser = argparse.ArgumentParser(prog=f"breedlabel submit {kind}")
    module.add_arguments(parser)
    return parser.parse_args(job_args)  # exits 2 on a usage error


# The job options that name files or folders (label, train, tune): checked whether or not they exist
# here, since an output usually does not exist yet. --weights also takes the keywords below.
PATH_OPTIONS = ("inputs", "model", "out", "manifests", "data", "config", "checkpoint_dir", "not_dogs", "storage",
                "weights")
_WEIGHTS_KEYWORDS = ("imagenet", "none")


def _relative(value: str) -> bool:
    return "://" not in value and not os.path.isabs(value)


def _check_paths(ns: argparse.Namespace, job_args: Sequence[str]) -> None:
    """Refuse relative paths: the job runs in Ray's copy of the working dir on the cluster, where a
    relative --out lands inside Ray's package cache (published there, then deleted) and a relative
    --model is not found. Every path option is checked, and any other argument (`--opt=VALUE`
    included) that names something existing here."""
    from core.sources import is_stream

    for dest in PATH_OPTIONS:
        value = getattr(ns, dest, None)
        for item in (value if isinstance(value, (list, tuple)) else [value]):
            if dest == "manifests" and isinstance(item, str) and is_stream(item):
                raise ConfigError(f"--manifest {item}: a submitted job does not read this host's standard input or "
                                  "pipes; write the list to a file the cluster reads (s3://… or a shared path)")
            if not isinstance(item, str) or not item or not _relative(item):
                continue
            if dest == "weights" and item.lower() in _WEIGHTS_KEYWORDS:
                continue
            name = "input" if dest == "inputs" else f"--{'manifest' if dest == 'manifests' else dest.replace('_', '-')}"
            raise _relative_path_error(f"{name} {item}")
    for token in job_args:
        value = token.partition("=")[2] if token.startswith("--") else token
        if value and not value.startswith("-") and _relative(value) and os.path.exists(value):
            raise _relative_path_error(value)


def _relative_path_error(what: str) -> ConfigError:
    path = what.rpartition(" ")[2]
    return ConfigError(f"{what}: relative path; the job runs in its own working directory on the cluster. "
                       f"Give {os.path.abspath(path)} or an s3:// URI")


def _lease_skip(output: str, connect: Callable[[], Any]) -> int | None:
    """Skip before submitting when a live run holds the lease (the job checks again, atomically).
    A holder on another host cannot be looked up from here: a job SIGKILLed on the head leaves its
    lease until it expires (--lease-ttl). Then the cluster's jobs decide: skip when one of them
    labels this output, else submit, and the job (on the head, where such a holder ran) takes the
    output over from a dead holder or skips."""
    try:
        holder = leases.read_lease(output)
    except (BreedlabelError, OSError) as exc:  # no access from here: the job decides
        print(f"breedlabel submit: note: cannot read the lease of {output} from here ({exc})", file=sys.stderr)
        return None
    now = time.time()
    if not leases.is_live(holder, now):
        return None
    job = ""
    if not leases.held_on_this_host(holder):
        running = cluster_submit.running_label_jobs(connect(), output)
        if not running:
            print(f"breedlabel submit: note: run {holder.run_id} on {holder.host or 'another host'} holds the "
                  f"lease of {output}, but no job on this cluster labels it: submitting; the job takes the output "
                  "over if that run is gone, or skips", file=sys.stderr)
            return None
        job = f" (job {running[0]} on the cluster)"
    print(f"breedlabel submit: skipped{job}: {leases.LeaseHeldError(leases.lease_uri(output), holder, now)}",
          file=sys.stderr)
    return EXIT_LEASE_HELD


def _env_vars(pairs: Sequence[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ConfigError(f"--env {pair!r}: use NAME=VALUE")
        out[name] = value
    return out


def build_request(args: argparse.Namespace, job_args: list[str]) -> cluster_submit.JobRequest:
    ns = _job_namespace(args.job, job_args)
    _check_paths(ns, job_args)
    if args.job == "label":  # its value checks too (--top-k 0, --lease-ttl 1): found on the cluster, after sending
        LabelConfig(**options.values(ns, LabelConfig)).check()
        if getattr(ns, "address", None):  # the job's own --address, on the cluster
            ray_session.check_address(ns.address, ray_data="the label job", ray_client_instead="Leave the job's "
                                      "--address out: a submitted job runs on the cluster and joins it by itself")
    output = getattr(ns, "out", None) if args.job == "label" and not getattr(ns, "dry_run", False) else None
    if args.submission_id:
        cluster_submit.check_job_id(args.submission_id, "--submission-id")
    env = runtime_env.build_runtime_env(args.runtime_env, working_dir=args.working_dir, env_vars=_env_vars(args.env))
    return cluster_submit.JobRequest(kind=args.job, job_args=tuple(job_args), runtime_env=env, output=output,
                                     submission_id=args.submission_id, entrypoint_num_cpus=args.entrypoint_num_cpus,
                                     entrypoint_num_gpus=args.entrypoint_num_gpus)


def run(args: argparse.Namespace) -> int:
    job_args = split_args(args)
    try:
        req = build_request(args, job_args)
    except SystemExit as exc:  # the job's parser rejected its options (message already printed)
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    connected = functools.cache(lambda: cluster_submit.connect(args.address))  # once, and only when needed
    if req.output:
        skipped = _lease_skip(req.output, connected)
        if skipped is not None:
            return skipped
    client = connected()
    job_id = cluster_submit.submit(client, req)
    print(job_id, flush=True)
    print(f"breedlabel submit: submitted {req.kind} job {job_id} to {args.address}; "
          f"`breedlabel jobs status {job_id}`, `breedlabel jobs logs {job_id} --follow`",
          file=sys.stderr)
    if not (args.wait or args.follow):
        return EXIT_OK
    try:  # SIGTERM (cron's timeout, a pod's deadline) and Ctrl-C end the wait, not the job: say so
        with GracefulStop():
            started = time.monotonic()
            if args.follow:
                cluster_submit.follow_logs(client, job_id, out=sys.stderr, timeout_s=args.wait_timeout)
            left = None if args.wait_timeout is None else max(0.0, args.wait_timeout - (time.monotonic() - started))
            result = cluster_submit.outcome(cluster_submit.wait(client, job_id, timeout_s=left))
    except Stopped as exc:
        raise Stopped(f"{exc} while waiting; job {job_id} keeps running on the cluster: `breedlabel jobs status "
                      f"{job_id}` follows it, `breedlabel jobs stop {job_id}` stops it") from None
    if result.exit_code != EXIT_OK and not args.follow:  # the scheduler's log shows why
        tail = cluster_submit.logs(client, job_id).splitlines()[-LOG_TAIL_LINES:]
        print("\n".join(f"  | {line}" for line in tail), file=sys.stderr)
    print(f"breedlabel submit: job {job_id} {result.status}: {result.message}", file=sys.stderr)
    return result.exit_code
