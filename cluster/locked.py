"""Run a command while holding the output's lease: the job entrypoint of scheduled label runs.

    python -m cluster.locked --output s3://bucket/labels/ -- python -m jobs.label IN --out s3://bucket/labels/ ...

Takes `<output>/_lease.json` (see cluster.lease), renews it while the command runs and
releases it when the command ends, so two runs on the same output never overlap, whichever
scheduler started them. If a live run holds the lease, this prints who holds it and exits
with EXIT_LEASE_HELD (75) without running anything. `breedlabel submit label` wraps the label
entrypoint in this; plain `ray job submit -- python -m cluster.locked ...` works the same.
The lease lives in the job's driver, on the cluster, so it is held exactly as long as the job
runs, whether or not the submitter waits.
"""
from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
import uuid
from typing import Sequence

from cluster import lease as leases
from core.errors import EXIT_FAILED, EXIT_USAGE, BreedlabelError

log = logging.getLogger("breedlabel.locked")
_CHILD_GRACE_S = 20.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cluster.locked", description=__doc__.strip().splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output", required=True, help="output URI whose lease to hold")
    parser.add_argument("--ttl", type=float, default=leases.DEFAULT_TTL_S,
                        help="lease lifetime in seconds; renewed every ttl/3 while running")
    parser.add_argument("--run-id", default=None, help="recorded in the lease (default: random)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    return parser


def _terminate(child: subprocess.Popen) -> None:
    if child.poll() is None:
        child.terminate()
        try:
            child.wait(timeout=_CHILD_GRACE_S)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def run_locked(output: str, command: Sequence[str], *, ttl_s: float, run_id: str) -> int:
    """The command's exit code; EXIT_LEASE_HELD when skipped; EXIT_FAILED if the lease is lost."""
    lost: list[BaseException] = []
    child: subprocess.Popen | None = None

    def on_lost(exc: BaseException) -> None:
        lost.append(exc)
        if child is not None:
            _terminate(child)

    def on_sigterm(signum, _frame) -> None:  # `ray job stop`: stop the child, then release
        if child is not None:
            _terminate(child)
        raise SystemExit(128 + signum)

    with leases.held(output, run_id, ttl_s=ttl_s, on_lost=on_lost) as lease:
        log.info("holding %s (run %s, ttl %.0f s)", lease.uri, run_id, ttl_s)
        previous = signal.signal(signal.SIGTERM, on_sigterm)
        try:
            child = subprocess.Popen(list(command))
            code = child.wait()
        finally:
            signal.signal(signal.SIGTERM, previous)
            if child is not None:
                _terminate(child)
    if lost:
        print(f"cluster.locked: error: {lost[0]}", file=sys.stderr)
        return EXIT_FAILED
    return code


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        print("cluster.locked: error: give the command to run after --", file=sys.stderr)
        return EXIT_USAGE
    try:
        return run_locked(args.output, command, ttl_s=args.ttl, run_id=args.run_id or uuid.uuid4().hex)
    except leases.LeaseHeldError as exc:
        print(f"cluster.locked: skipped: {exc}", file=sys.stderr)
        return exc.exit_code
    except BreedlabelError as exc:
        print(f"cluster.locked: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
