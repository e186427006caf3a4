"""Multi-node behaviour without a cloud: a label run on a 3-node (head + 2 workers) `ray.cluster_utils.Cluster` (one
machine), a worker node killed mid-run, and still every input labelled exactly once.

Why it holds: the predict actors are a Ray Data actor pool (restarted, batches retried on the
surviving actors), rows return to the driver, which alone writes parts with deterministic
names, and the run is published only when every listed input has a row.
"""
from __future__ import annotations

import threading
import time
import pyarrow.parquet as pq
import pytest

from tests.fixtures.images import jpeg_bytes

N_IMAGES = 900
RUN_TIMEOUT_S = 420
pytestmark = pytest.mark.slow


@pytest.fixture
def three_nodes(tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    # The head has no CPUs (like a cluster whose head only runs drivers): the predict actors land
    # one per worker node, so a worker can be lost while the driver's side survives.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "object_store_memory": 100 * 1024 * 1024})
    workers = [cluster.add_node(num_cpus=1, object_store_memory=100 * 1024 * 1024) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    try:
        yield cluster, workers
    finally:
        ray.shutdown()
        cluster.shutdown()


def _alive_actors() -> list[tuple[str, str]]:
    """(node id, class name) of alive actors, from the GCS of the connected cluster.

    Not the state API: that goes through a dashboard address and, with several Ray instances
    on one machine, can end up asking another cluster.
    """
    from ray._private import state

    return [(a["Address"]["NodeID"], a["ActorClassName"]) for a in state.actors().values()
            if a["State"] == "ALIVE"]


def _victim(workers):
    """A worker node running a predict actor, and not the listing queue (the driver's side)."""
    actors = _alive_actors()
    queue_nodes = {node for node, cls in actors if "Queue" in cls}
    pool_nodes = {node for node, cls in actors if "MapWorker" in cls}
    return next((n for n in workers if n.node_id in pool_nodes and n.node_id not in queue_nodes), None)


def test_node_lost_mid_run_every_input_labelled_once(three_nodes, tiny_bundle, tmp_path):
    from core.output import MANIFEST_FILE, Output
    from core.label_config import LabelConfig
    from jobs.label import label

    cluster, workers = three_nodes
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(N_IMAGES):
        (photos / f"dog{i:04d}.jpg").write_bytes(jpeg_bytes(64 + i % 7, 48))
    out = tmp_path / "labels"
    cfg = LabelConfig(inputs=(str(photos),), model=str(tiny_bundle), out=str(out), batch_size=16,
                      rows_per_file=48, cpus_per_actor=1, progress=False)
    result: dict = {}

    def run() -> None:
        try:
            result["manifest"] = label(cfg)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + RUN_TIMEOUT_S
    victim = None
    while victim is None and thread.is_alive():  # as soon as a worker node holds a predict actor
        assert time.monotonic() < deadline, "no predict actor started in time"
        victim = _victim(workers)
        time.sleep(0.1)
    assert victim is not None, f"the run ended before a worker node ran a predict actor: {result}"
    cluster.remove_node(victim, allow_graceful=False)  # like a spot instance reclaimed
    thread.join(timeout=max(1.0, deadline - time.monotonic()))
    assert not thread.is_alive(), "the run did not finish after losing a node"
    assert "error" not in result, repr(result.get("error"))

    manifest = result["manifest"]
    assert (out / f"run_id={manifest['run_id']}" / MANIFEST_FILE).is_file()
    rows = pq.read_table(str(out))  # the folder as a dataset: finished runs only
    uris = rows.column("uri").to_pylist()
    assert sorted(uris) == sorted(str(p) for p in photos.iterdir())  # each input exactly once
    assert rows.column("error").null_count == rows.num_rows
    assert len(Output(str(out)).finished_runs()) == 1
