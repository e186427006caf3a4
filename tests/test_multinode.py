"""Multi-node behaviour without a cloud: a label run on a 3-node (head + 2 workers) `ray.cluster_utils.Cluster` (one
machine), a worker node killed while its predict actor holds a chunk, and still every input labelled exactly once.

Why it holds: the predict actors are a Ray Data actor pool (restarted, batches retried on the
surviving actors), rows return to the driver, which alone writes parts with deterministic
names, and the run is published only when every listed input has a row.
"""
from __future__ import annotations

import os
import threading

import pyarrow.parquet as pq
import pytest

from tests.fixtures.images import jpeg_bytes
from tests.fixtures.waiting import wait_until

N_IMAGES = 240
RUN_TIMEOUT_S = 420
pytestmark = pytest.mark.slow


# Loaded by every worker process of the two worker nodes (sitecustomize on their PYTHONPATH): the
# first process to label a chunk records its node in HOLD_MARKER and keeps the chunk until its node
# is killed, so the kill always catches a chunk in flight, which must then be labelled elsewhere.
_HOLD_HOOK = """
import importlib.util, os, sys, time

class _HoldFirstChunk:
    def find_spec(self, name, path=None, target=None):
        if name != "core.labelling":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            real = module.BatchLabeller.label

            def label(self, table):
                try:
                    fd = os.open(os.environ["HOLD_MARKER"], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    return real(self, table)
                import ray
                os.write(fd, ray.get_runtime_context().get_node_id().encode())
                os.close(fd)
                while True:
                    time.sleep(1)

            module.BatchLabeller.label = label

        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, _HoldFirstChunk())
"""


@pytest.fixture
def three_nodes(tmp_path):
    """(cluster, workers, hold marker): worker nodes run the hold hook."""
    import ray
    from ray.cluster_utils import Cluster

    from tests.fixtures.crash import REPO

    if ray.is_initialized():
        ray.shutdown()
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_HOLD_HOOK)
    marker = tmp_path / "held"
    env = {"HOLD_MARKER": str(marker),
           "PYTHONPATH": os.pathsep.join([str(hook), str(REPO), os.environ.get("PYTHONPATH", "")])}
    # The head has no CPUs (like a cluster whose head only runs drivers): the predict actors land
    # one per worker node, so a worker can be lost while the driver's side survives.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "object_store_memory": 100 * 1024 * 1024})
    workers = [cluster.add_node(num_cpus=1, object_store_memory=100 * 1024 * 1024, env_vars=env) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    try:
        yield cluster, workers, marker
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_node_lost_mid_run_every_input_labelled_once(three_nodes, tiny_bundle, tmp_path):
    from core.output import MANIFEST_FILE, Output
    from core.label_config import LabelConfig
    from jobs.label import label

    cluster, workers, held = three_nodes
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

    def holding() -> str:
        assert thread.is_alive(), f"the run ended before a predict actor held a chunk: {result}"
        return held.exists() and held.read_text()

    node_id = wait_until(holding, what="a predict actor holding a chunk", timeout_s=RUN_TIMEOUT_S, every_s=0.1)
    (victim,) = [n for n in workers if n.node_id == node_id]
    cluster.remove_node(victim, allow_graceful=False)  # like a spot instance reclaimed, its chunk unfinished
    thread.join(timeout=RUN_TIMEOUT_S)
    assert not thread.is_alive(), "the run did not finish after losing a node"
    assert "error" not in result, repr(result.get("error"))

    manifest = result["manifest"]
    assert (out / f"run_id={manifest['run_id']}" / MANIFEST_FILE).is_file()
    rows = pq.read_table(str(out))  # the folder as a dataset: finished runs only
    uris = rows.column("uri").to_pylist()
    assert sorted(uris) == sorted(str(p) for p in photos.iterdir())  # each input exactly once
    assert rows.column("error").null_count == rows.num_rows
    assert len(Output(str(out)).finished_runs()) == 1
