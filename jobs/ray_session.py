"""Connecting a job to Ray: the cluster it was submitted to, or a private local one.

Inside `ray job submit` / a KubeRay RayJob, Ray sets RAY_ADDRESS for the driver, so the job
joins that cluster. Without an address we start a Ray of our own ("local"), never whichever
instance happens to run on this machine.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys

from cluster import address as address_probe
from core.errors import ConfigError, JobError
from core.stop import GracefulStop, signals_ignored


_RAY_CLIENT_INSTEAD = ("Submit it instead (`breedlabel submit label … --address http://HEAD:8265`), or run it on a "
                       "cluster node with --address HEAD:6379")


def check_address(address: str | None, *, ray_data: str | None = None,
                  ray_client_instead: str = _RAY_CLIENT_INSTEAD) -> None:
    """Usage errors of the address a driver joins (given, or RAY_ADDRESS), before anything starts:
    - a job API address (http://HEAD:8265, what `submit` takes): Ray's ValueError, a 30-line traceback;
    - for `ray_data` (what runs Ray Data, e.g. "the label job"), a Ray Client address (ray://…): Ray
      Data's streaming executor needs the driver's core worker, which a Ray Client driver does not
      have; it failed after the listing with Ray's traceback."""
    given = "--address" if address else "RAY_ADDRESS"
    address = address or os.environ.get("RAY_ADDRESS") or ""
    scheme = address.strip().lower().partition("://")[0] if "://" in address else ""
    if scheme in ("http", "https"):
        raise ConfigError(f"{given} {address}: that is a job API (dashboard) address, which a Ray driver does not "
                          "join; give the cluster's GCS address (HEAD:6379, or auto on one of its nodes), or run it "
                          f"on the cluster with `breedlabel submit … --address {address}`")
    if scheme == "ray" and ray_data:
        raise ConfigError(f"{given} {address}: {ray_data} cannot run over Ray Client (ray://): Ray Data needs a driver "
                          f"on the cluster. {ray_client_instead}")


def connect(address: str | None = None, *, num_cpus: int | None = None, dashboard: bool = True,
            quiet: bool = False, stop: GracefulStop | None = None) -> bool:
    """ray.init once; returns True when this call started it (so the caller shuts it down).

    quiet: keep workers' logs off the driver's console (the label job prints its own progress).
    Otherwise Ray's own INFO lines (where the dashboard is, auth notices) show only with -v.
    stop: the run's armed stop. A signal while Ray starts (a few seconds) is held until it has
    started, then raised as `Stopped`: raised inside `ray.init` it is caught and printed by Ray,
    which goes on starting. A second signal gives up waiting (KeyboardInterrupt: a cluster that
    does not answer). Ray also swaps in a SIGTERM handler of its own (`sys.exit(15)`) first
    thing, so that exit is read as the stop it is, and `stop` is armed again after.
    """
    import ray

    from core import console

    if ray.is_initialized():
        if stop is not None:
            stop.check()
        return False
    check_address(address)
    given = "--address" if address else "RAY_ADDRESS"
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    local = address == "local"
    if not local:
        address_probe.check_reachable(address, given)
    extra = dict(logging_level=logging.WARNING, configure_logging=False, log_to_driver=False) if quiet \
        else dict(logging_level=logging.INFO if console.is_verbose() else logging.WARNING)
    try:
        with console.quiet_logger(_TOKEN_NOTICE, enabled=local and not console.is_verbose()), \
                (stop.deferred(second_interrupts=True) if stop else contextlib.nullcontext()):
            ray.init(address=address, num_cpus=num_cpus if local else None,
                     include_dashboard=dashboard if local else None, **extra)
    except SystemExit as exc:
        if stop is None or exc.code != signal.SIGTERM:
            raise
        stop.request("stopped by SIGTERM")
    except ValueError as exc:  # an address Ray cannot parse
        if local:
            raise
        raise ConfigError(f"{given} {address}: not a Ray address ({str(exc).splitlines()[0]})") from None
    except ConnectionError as exc:  # something answers there, not a Ray cluster Ray can join
        if local:
            raise
        raise JobError(f"{given} {address}: cannot join a Ray cluster there ({str(exc).splitlines()[0]}); give the "
                       "address `ray status` prints on the cluster's head, or none for a Ray of this command's "
                       "own") from None
    if stop is not None and stop.reason is not None:
        # Ray's native failure handler (Abseil's) is in place for SIGTERM while Ray starts: it logs a
        # C++ stack, hands the signal on, and arms alarm(3) to abort the process (exit 134) in case
        # that hangs; the stop is handled, so that alarm is cancelled
        signal.alarm(0)
    global _started
    _started = True
    if quiet:
        cluster_messages_to_log()
    if stop is not None:
        stop.arm()
        stop.check()
    return True


def cluster_messages_to_log() -> None:
    """Ray's driver prints the cluster's messages for it ("(raylet) Task MapWorker(…).submit failed.
    There are infinite retries remaining …", pushed while Ray Data kills its actors at a stop) on
    sys.stdout, with colour codes, from a thread of its own, log_to_driver=False or not: stdout is
    where scripts read a command's results. For a quiet driver they go to this module's logger
    (shown with -v). Workers' own output is not touched (log_to_driver)."""
    from ray._private import worker

    printer = getattr(worker, "print_to_stdstream", None)
    if printer is None or getattr(printer, "_breedlabel", False):
        return
    cluster_log = logging.getLogger(__name__)  # not under "ray": Ray's own handler would print it

    def to_log(data, ignore_prefix):
        if data.get("pid") != "raylet":
            return printer(data, ignore_prefix)
        for line in data.get("lines", ()):
            cluster_log.debug("(raylet) %s", line)

    to_log._breedlabel = True
    worker.print_to_stdstream = to_log


_started = False  # this process started the Ray it is connected to (connect): it shuts it down


def shutdown_uninterruptible() -> None:
    """Shut down the Ray `connect` started (not one a caller started: tests share theirs), with
    SIGINT/SIGTERM ignored meanwhile: a second Ctrl-C during Ray's own shutdown at exit ended it
    half-way (a traceback, and Ray's agents left running with no parent). Native lines from then
    on go to a log: the command's own message stays its last line."""
    global _started
    ray = sys.modules.get("ray")
    if not _started or ray is None:  # started, even if a stop cut ray.init short: its processes run
        return
    _started = False
    from core import console

    console.native_output_to_log_until_exit("ray-shutdown.log")
    with signals_ignored():
        ray.shutdown()


# Its "token authentication is enabled for this Ray cluster" notice is about a cluster someone
# else could reach; a private local Ray of one command is not that.
_TOKEN_NOTICE = "ray._private.authentication.authentication_token_setup"


def driver_node_label() -> dict[str, str]:
    """A label selector that keeps Ray Data tasks on the driver's node (as Ray's own local reads do)."""
    import ray

    return {"ray.io/node-id": ray.get_runtime_context().get_node_id()}


def driver_node_affinity() -> dict:
    """Ray remote args that keep a task or actor on the driver's node.

    For the pieces a run cannot lose (the listing queue and its relays): a worker node that
    dies mid-run — a preempted spot GPU, say — then costs only retried batches.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False)}
