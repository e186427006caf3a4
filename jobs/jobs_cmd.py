"""Inspect and control jobs on a Ray cluster: status, logs, stop, list.

    breedlabel jobs list --address http://127.0.0.1:8265
    breedlabel jobs status JOB_ID [--wait]
    breedlabel jobs logs JOB_ID [--follow]
    breedlabel jobs stop JOB_ID

`status` exits like `breedlabel submit --wait` once the job has ended (0 done, 3 over the
error budget, 75 skipped, 2 bad options, 1 failed/stopped; a label job is judged by its run
manifest) and 0 while it is still pending or running.
"""
from __future__ import annotations

import argparse
import sys

from cluster import submit as cluster_submit
from core.errors import EXIT_FAILED, EXIT_OK, ConfigError, JobError

ACTIONS = ("status", "logs", "stop", "list")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=ACTIONS, help="what to do")
    parser.add_argument("job_id", nargs="?", default=None, help="submission id (not for list)")
    parser.add_argument("--address", default=cluster_submit.default_address(),
                        help="Ray job API (dashboard) address; $RAY_ADDRESS if it is http(s)://")
    parser.add_argument("--wait", action="store_true", help="status: wait for the job to end")
    parser.add_argument("--wait-timeout", type=float, default=None, metavar="S",
                        help="status --wait: give up after S seconds")
    parser.add_argument("--follow", action="store_true", help="logs: stream until the job ends")


def _status(client, args: argparse.Namespace) -> int:
    info = cluster_submit.wait(client, args.job_id, timeout_s=args.wait_timeout) if args.wait \
        else cluster_submit.job_info(client, args.job_id)
    status = cluster_submit.status_of(info)
    if status not in cluster_submit.TERMINAL:
        print(f"{args.job_id} {status}")
        return EXIT_OK
    result = cluster_submit.outcome(info)
    print(f"{args.job_id} {status}: {result.message}")
    return result.exit_code


def _stop(client, job_id: str) -> int:
    """Exit 0 once the job is not running: stopped now, or ended already (a script making sure)."""
    if cluster_submit.stop(client, job_id):
        info = cluster_submit.wait(client, job_id, timeout_s=60)
        print(f"{job_id} {cluster_submit.status_of(info)}")
        return EXIT_OK
    status = cluster_submit.status_of(cluster_submit.job_info(client, job_id))
    if status in cluster_submit.TERMINAL:
        print(f"{job_id} {status} already; nothing to stop")
        return EXIT_OK
    print(f"{job_id} is {status} and did not take the stop; try again", file=sys.stderr)
    return EXIT_FAILED


def run(args: argparse.Namespace) -> int:
    if args.action != "list" and not args.job_id:
        raise ConfigError(f"jobs {args.action}: give the job's submission id (`breedlabel jobs list` shows them)")
    if args.job_id and args.action != "list":
        cluster_submit.check_job_id(args.job_id)
    if args.action == "list" and args.job_id:
        raise ConfigError(f"jobs list takes no job id ({args.job_id}); `breedlabel jobs status {args.job_id}` shows "
                          "one job")
    client = cluster_submit.connect(args.address)
    if args.action == "list":
        print(cluster_submit.describe(cluster_submit.list_rows(client)))
        return EXIT_OK
    if args.action == "status":
        return _status(client, args)
    if args.action == "stop":
        return _stop(client, args.job_id)
    if args.follow:
        cluster_submit.follow_logs(client, args.job_id)
        try:
            status = cluster_submit.status_of(cluster_submit.job_info(client, args.job_id))
        except JobError as exc:  # the head went away mid-stream
            raise JobError(f"the log stream of job {args.job_id} ended and the job API does not answer ({exc}); "
                           "run the same command again once the cluster is back") from None
        if status not in cluster_submit.TERMINAL:  # the stream dropped (a head restart, a proxy's timeout)
            raise JobError(f"job {args.job_id} is still {status} but its log stream ended; run the same "
                           "command again to go on following it")
    else:
        sys.stdout.write(cluster_submit.logs(client, args.job_id))
    return EXIT_OK
