"""The Ray Data side of `breedlabel label`: streamed listing in, Arrow rows out.

    listing (driver thread) -> bounded Ray queue -> read tasks -> predict actors -> driver writer

Why a queue: Ray Data plans read tasks from a list known up front, but a bucket's listing is
a generator that may take longer than the labelling; a driver thread puts chunks of the
listing into a bounded `ray.util.queue.Queue` and a few read tasks pull from it, so labelling
starts with the first page and memory is bounded by the queue, not by the bucket.

On CPU nodes the predict actor also decodes (`core.labelling.BatchLabeller`: a thread pool for
reads and decode, then the runtime on the same cores): measured faster than a separate Ray
decode stage (see bench/label_throughput.py). With GPUs, decode runs as CPU tasks and each
GPU gets one TensorFlow actor. Rows come back to the driver, which writes the Parquet parts:
they are small (no image data), and one writer keeps part names deterministic.
"""
from __future__ import annotations

import logging
import threading
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa

from core import labelling
from jobs import ray_session
from jobs.label import LabelConfig

log = logging.getLogger(__name__)

DECODE_TASK_MEMORY = 256 << 20  # a decode task's batch of large photos, bytes + decoded arrays
READ_TASKS = 2          # listing relays; they do no work beyond handing chunks on
_QUEUE_POLL_S = 0.5


def chunk_table(items: list) -> pa.Table:
    """InputItems -> the columns read tasks hand to the pipeline."""
    return pa.table({
        labelling.COL_URI: pa.array([it.uri for it in items], pa.string()),
        labelling.COL_MEMBER: pa.array([it.member for it in items], pa.string()),
        labelling.COL_DATA: pa.array([getattr(it, "data", None) for it in items], pa.binary()),
        labelling.COL_ERROR: pa.array([getattr(it, "error", None) for it in items], pa.string()),
    })


class Feeder:
    """Driver thread: streams the listing into a bounded queue, one chunk per batch."""

    def __init__(self, items: Iterable, chunk: int, maxsize: int):
        from ray.util.queue import Queue

        self.queue = Queue(maxsize=maxsize, actor_options={"num_cpus": 0, **ray_session.driver_node_affinity()})
        self.listed = 0
        self.finished = False
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._items, self._chunk = items, chunk
        self._thread = threading.Thread(target=self._run, name="label-listing", daemon=True)

    def start(self) -> "Feeder":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _put(self, item) -> bool:
        from ray.util.queue import Full

        while not self._stop.is_set():
            try:
                self.queue.put(item, timeout=_QUEUE_POLL_S)
                return True
            except Full:
                continue
        return False

    def _run(self) -> None:
        import ray

        try:
            buf: list = []
            for item in self._items:
                buf.append(item)
                if len(buf) >= self._chunk:
                    if not self._put([ray.put(chunk_table(buf))]):
                        return
                    self.listed += len(buf)
                    buf = []
            if buf and self._put([ray.put(chunk_table(buf))]):
                self.listed += len(buf)
            self.finished = True
        except BaseException as exc:  # surfaced by the driver loop; the job fails with exit 1
            self.error = exc
        finally:
            self._put(None)


def _queue_datasource(queue, n_tasks: int):
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    class ListingQueueDatasource(Datasource):
        def estimate_inmemory_data_size(self):
            return None

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            def read() -> Iterator[pa.Table]:
                import ray

                while True:
                    got = queue.get()
                    if got is None:
                        queue.put(None)  # let the sibling read tasks see the end too
                        return
                    yield ray.get(got[0])

            meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
            return [ReadTask(read, meta) for _ in range(n_tasks)]

    return ListingQueueDatasource()


class LabelActor:
    """Fused stage (CPU): load the bundle once, then read + decode + predict each batch."""

    def __init__(self, model: str, run_id: str, done: list, *, runtime: str, threads: int,
                 decode_threads: int, io_threads: int, top_k: int):
        import ray

        from core.bundle import load_bundle

        keys = ray.get(done[0]) if done else None
        self.labeller = labelling.BatchLabeller(
            load_bundle(model), runtime=runtime, threads=threads, decode_threads=decode_threads,
            io_threads=io_threads, top_k=top_k, run_id=run_id, done_keys=keys)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        return self.labeller.label(batch)


class PredictActor(LabelActor):
    """Predict stage of the two-stage pipeline (GPU, or measured on CPU): decoded batches in."""

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        return self.labeller.label_decoded(batch)


def resources() -> tuple[int, int, int]:
    """(total CPUs, CPUs of the smallest alive node, GPUs) of the connected cluster."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    cpus = [int(n["Resources"].get("CPU", 0)) for n in nodes if n["Resources"].get("CPU", 0) >= 1]
    gpus = int(sum(n["Resources"].get("GPU", 0) for n in nodes))
    return sum(cpus), (min(cpus) if cpus else 1), gpus


def plan(cfg: LabelConfig) -> dict:
    """Pipeline shape from the config and the cluster: pipeline, actors, CPUs and threads each."""
    total, per_node, gpus = resources()
    pipeline = cfg.pipeline
    if pipeline == "auto":
        pipeline = "two-stage" if gpus and cfg.runtime != "openvino" else "fused"
    use_gpu = pipeline == "two-stage" and gpus > 0 and cfg.runtime != "openvino"
    if use_gpu:
        actors, cpus = cfg.actors or gpus, cfg.cpus_per_actor or 1
    else:
        cpus = min(cfg.cpus_per_actor or per_node, total)
        actors = cfg.actors or max(1, total // cpus)
        if pipeline == "two-stage":  # CPU: leave cores to the decode tasks
            cpus = cfg.cpus_per_actor or max(1, per_node // 2)
            actors = cfg.actors or 1
    return {"pipeline": pipeline, "actors": actors, "cpus_per_actor": cpus, "gpus_per_actor": 1 if use_gpu else 0,
            "decode_threads": cfg.decode_threads or cpus, "runtime_threads": cpus, "cluster_cpus": total}


def build_dataset(cfg: LabelConfig, shape: dict, queue, run_id: str, done_ref):
    """read (queue) -> [decode tasks] -> predict actors; rows come out as Arrow tables."""
    import ray
    from ray.data import ActorPoolStrategy

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ds = ray.data.read_datasource(_queue_datasource(queue, READ_TASKS), num_cpus=0,
                                  override_num_blocks=READ_TASKS,
                                  ray_remote_args=ray_session.driver_node_affinity())
    done = [done_ref] if done_ref is not None else []
    actor_kwargs = dict(model=cfg.model, run_id=run_id, done=done, runtime=cfg.runtime,
                        threads=shape["runtime_threads"], decode_threads=shape["decode_threads"],
                        io_threads=cfg.io_threads, top_k=cfg.top_k)
    compute = ActorPoolStrategy(size=shape["actors"])
    if shape["pipeline"] == "fused":
        return ds.map_batches(LabelActor, fn_constructor_kwargs=actor_kwargs, compute=compute,
                              batch_size=cfg.batch_size, batch_format="numpy", num_cpus=shape["cpus_per_actor"],
                              zero_copy_batch=True)
    from core.bundle import load_bundle

    bundle = load_bundle(cfg.model)
    # A memory request of its own also keeps Ray from fusing this stage into the actors.
    decoded = ds.map_batches(
        _decode_stage, batch_size=cfg.batch_size, batch_format="numpy", num_cpus=1, memory=DECODE_TASK_MEMORY,
        fn_kwargs=dict(size=bundle.input_size, policy=bundle.resize_policy, model_id=bundle.model_id,
                       done=done, io_threads=cfg.io_threads))
    actor_kwargs["decode_threads"] = 1
    return decoded.map_batches(PredictActor, fn_constructor_kwargs=actor_kwargs, compute=compute,
                               batch_size=cfg.batch_size, batch_format="numpy",
                               num_cpus=shape["cpus_per_actor"], num_gpus=shape["gpus_per_actor"])


def _decode_stage(batch: dict[str, np.ndarray], *, size, policy, model_id, done, io_threads) -> dict:
    import ray

    keys = ray.get(done[0]) if done else None
    return labelling.decode_batch(batch, size=tuple(size), policy=policy, model_id=model_id, done=keys,
                                  io_threads=io_threads)
