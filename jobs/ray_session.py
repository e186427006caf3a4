"""Connecting a job to Ray: the cluster it was submitted to, or a private local one.

Inside `ray job submit` / a KubeRay RayJob, Ray sets RAY_ADDRESS for the driver, so the job
joins that cluster. Without an address we start a Ray of our own ("local"), never whichever
instance happens to run on this machine.
"""
from __future__ import annotations

import logging
import os


def connect(address: str | None = None, *, num_cpus: int | None = None, dashboard: bool = True,
            quiet: bool = False) -> bool:
    """ray.init once; returns True when this call started it (so the caller shuts it down).

    quiet: keep workers' logs off the driver's console (the label job prints its own progress).
    Otherwise Ray's own INFO lines (where the dashboard is, auth notices) show only with -v.
    """
    import ray

    from core import console

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    local = address == "local"
    extra = dict(logging_level=logging.WARNING, configure_logging=False, log_to_driver=False) if quiet \
        else dict(logging_level=logging.INFO if console.is_verbose() else logging.WARNING)
    with console.quiet_logger(_TOKEN_NOTICE, enabled=local and not console.is_verbose()):
        ray.init(address=address, num_cpus=num_cpus if local else None,
                 include_dashboard=dashboard if local else None, **extra)
    return True


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
