"""The Ray side of `breedlabel label`: the streamed listing in, label rows out to the run.

    listing (driver thread) -> bounded Ray queue -> read tasks -> [decode tasks] -> predict actors -> LabelRun

Why a queue: Ray Data plans read tasks from a list known up front, but a bucket's listing is
a generator that may take longer than the labelling; a driver thread puts chunks of the
listing into a bounded `ray.util.queue.Queue` and a few read tasks pull from it, so labelling
starts with the first page and memory is bounded by the queue, not by the bucket.

Why one row per chunk: Ray Data merges the small blocks a task yields until they reach
`target_max_block_size` (128 MiB), so a long-lived read task handed its whole listing on in
one block at the end, and the rows of a 3,000-image run reached the driver together after
79 s. Here every Ray Data row is a whole chunk (an Arrow IPC payload: `batch_size` inputs in,
their label rows out) and blocks are never merged, so rows reach the driver chunk by chunk
and are staged as they come (core.label_run).

Everything that is not Ray lives in core: the plan (core.label_plan), the chunk logic
(core.labelling), the run state (core.label_run).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import sys
import threading
from typing import Iterable, Iterator

import pyarrow as pa

from core import console, labelling
from core.bundle import load_bundle
from core.errors import BreedlabelError, BundleError, ConfigError, InputError, JobError, ServiceError, StorageError
from core.label_config import LabelConfig
from core.label_plan import FUSED, ClusterResources, PipelinePlan, plan
from core.label_run import LabelRun
from core.sources import ItemData
from core.s3 import S3Options
from core.stop import GracefulStop, Stopped
from jobs import ray_session

log = logging.getLogger(__name__)

DECODE_TASK_MEMORY = 256 << 20  # a decode task's chunk of large photos, bytes + decoded arrays
READ_TASKS = 2          # listing relays; they do no work beyond handing chunks on
CHUNK = "chunk"         # the one column of every Ray Data row: an Arrow IPC payload
_QUEUE_POLL_S = 0.5
_LARGE_CHUNK = 8 << 20  # bytes of archive members in a chunk from which the listing queues it alone


def pack(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def unpack(payload: bytes) -> pa.Table:
    return pa.ipc.open_stream(payload).read_all()


def _row(table: pa.Table) -> pa.Table:
    return pa.table({CHUNK: pa.array([pack(table)], pa.binary())})


def _tables(batch: pa.Table) -> Iterator[pa.Table]:
    """The chunks of a Ray Data batch; a chunk that carries a run-level error raises it here."""
    for payload in batch.column(CHUNK).to_pylist():
        table = unpack(payload)
        failure = (table.schema.metadata or {}).get(_FAILURE_META)
        if failure is not None:
            kind, _, message = failure.decode().partition("\n")
            raise _FAILURES.get(kind, JobError)(message)
        yield table


# A run-level error an actor or task meets (a dead S3 endpoint) travels back as a chunk that says
# so: Ray's own exception wrapping loses the error's type and buries its message in a traceback.
_FAILURE_META = b"breedlabel.failure"
_FAILURES: dict[str, type[BreedlabelError]] = {c.__name__: c for c in (
    ServiceError, StorageError, BundleError, InputError, ConfigError, JobError)}


def _failing(fn):
    """Run `fn` on a batch; a BreedlabelError becomes a failure chunk for the driver to raise."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> pa.Table:
        try:
            return fn(*args, **kwargs)
        except BreedlabelError as exc:
            kind = type(exc).__name__ if type(exc).__name__ in _FAILURES else JobError.__name__
            marker = pa.schema([]).with_metadata({_FAILURE_META: f"{kind}\n{exc}".encode()}).empty_table()
            return _row(marker)
    return wrapper


class Feeder:
    """Driver thread: streams the listing into a bounded queue, one chunk per actor call.

    A chunk holds at most `chunk` items and, for archive members read by the listing, at most
    `chunk_bytes` of their bytes (one member over it travels alone): with `maxsize` chunks
    queued, the listing's bytes in flight stay bounded whatever the archives hold."""

    def __init__(self, items: Iterable[ItemData], chunk: int, maxsize: int, chunk_bytes: int = 64 << 20):
        from ray.util.queue import Queue

        self.queue = Queue(maxsize=maxsize, actor_options={"num_cpus": 0, **ray_session.driver_node_affinity()})
        self.listed = 0
        self.finished = False
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._items, self._chunk, self._chunk_bytes = items, chunk, chunk_bytes
        self._thread = threading.Thread(target=self._run, name="label-listing", daemon=True)

    def start(self) -> "Feeder":
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listing; waits for a queue call in flight (at most a poll), so no thread is
        inside Ray when the process exits or shuts Ray down."""
        self._stop.set()
        self._thread.join(timeout=2 * _QUEUE_POLL_S)

    def _put(self, item) -> bool:
        from ray.util.queue import Full

        while not self._stop.is_set():
            try:
                self.queue.put(item, timeout=_QUEUE_POLL_S)
                return True
            except Full:
                continue
        return False

    def _put_chunk(self, buf: list[ItemData]) -> bool:
        import ray

        if sum(len(i.data) for i in buf if i.data is not None) >= _LARGE_CHUNK and not self._drained():
            return False  # a large chunk (archive members) waits for an empty queue: few sit in memory at once
        if not self._put([ray.put(_row(labelling.chunk_table(buf)))]):
            return False
        self.listed += len(buf)
        return True

    def _drained(self) -> bool:
        while not self._stop.is_set():
            if self.queue.empty():
                return True
            self._stop.wait(_QUEUE_POLL_S / 5)
        return False

    def _run(self) -> None:
        try:
            buf: list[ItemData] = []
            size = 0
            for item in self._items:
                data = len(item.data) if item.data is not None else 0
                if buf and size + data > self._chunk_bytes:
                    if not self._put_chunk(buf):
                        return
                    buf, size = [], 0
                buf.append(item)
                size += data
                if len(buf) >= self._chunk:
                    if not self._put_chunk(buf):
                        return
                    buf, size = [], 0
            if buf and not self._put_chunk(buf):
                return
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
    """Fused stage (CPU): load the bundle once, then read + decode + predict each chunk."""

    def __init__(self, model: str, finished_box: list, *, runtime: str, threads: int, decode_threads: int,
                 io_threads: int, top_k: int, s3: S3Options, max_object_bytes: int, dog_threshold: float | None):
        keys = _finished_keys(finished_box)
        self.labeller = labelling.BatchLabeller(
            load_bundle(model), runtime=runtime, threads=threads, decode_threads=decode_threads,
            io_threads=io_threads, top_k=top_k, done_keys=keys, read=labelling.reader(s3, max_object_bytes),
            dog_threshold=dog_threshold)

    @_failing
    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.concat_tables([_row(self.labeller.label(t)) for t in _tables(batch)])


class PredictActor(LabelActor):
    """Predict stage of the two-stage pipeline (GPU, or measured on CPU): decoded chunks in."""

    @_failing
    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.concat_tables([_row(self.labeller.label_decoded(t)) for t in _tables(batch)])


@_failing
def _decode_stage(batch: pa.Table, *, size, policy, model_id, finished_box, io_threads, s3,
                  max_object_bytes) -> pa.Table:
    keys = _finished_keys(finished_box)
    read = labelling.reader(s3, max_object_bytes)
    return pa.concat_tables([_row(labelling.decode_chunk(t, size=tuple(size), policy=policy, model_id=model_id,
                                                         done_keys=keys, io_threads=io_threads, read=read))
                             for t in _tables(batch)])


def cluster_resources() -> ClusterResources:
    """CPUs and GPUs of the connected cluster's alive nodes."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    cpus = [int(n["Resources"].get("CPU", 0)) for n in nodes if n["Resources"].get("CPU", 0) >= 1]
    gpus = int(sum(n["Resources"].get("GPU", 0) for n in nodes))
    return ClusterResources(total_cpus=sum(cpus), min_node_cpus=min(cpus) if cpus else 1, gpus=gpus)


def _finished_keys(finished_box: list):
    """The keys finished since the run's listing (a resumed run's SkipSet), or None.

    The object ref travels boxed in a list: Ray resolves a ref passed as an argument by itself
    (once per task, and into the constructor's arguments), a boxed one is fetched here, once per
    actor, from the object store (zero-copy on the same node)."""
    if not finished_box:
        return None
    import ray

    return ray.get(finished_box[0])


def build_dataset(cfg: LabelConfig, pipeline_plan: PipelinePlan, queue, finished_ref):
    """read (queue) -> [decode tasks] -> predict actors; one row per chunk all the way."""
    import ray
    from ray.data import ActorPoolStrategy

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    if not console.is_verbose():  # "Progress bars disabled", "execution finished": Ray Data's, not the user's
        logging.getLogger("ray.data").setLevel(logging.ERROR)
    ctx.target_max_block_size = 1  # every row (a whole chunk) is its own block: nothing waits to be merged
    # Ray Data's buffers between the stages hold a few chunks, not the object store's 30 % of RAM:
    # with archives of large members the bytes in flight stay bounded (see LabelConfig.chunk_mb).
    ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
        object_store_memory=max(256 << 20, 4 * cfg.chunk_bytes))
    ds = ray.data.read_datasource(_queue_datasource(queue, READ_TASKS), num_cpus=0, override_num_blocks=READ_TASKS,
                                  label_selector=ray_session.driver_node_label())
    finished_box = [finished_ref] if finished_ref is not None else []
    actor_kwargs = dict(model=cfg.model, finished_box=finished_box, runtime=cfg.runtime,
                        threads=pipeline_plan.runtime_threads, decode_threads=pipeline_plan.decode_threads,
                        io_threads=cfg.io_threads, top_k=cfg.top_k, s3=cfg.s3, max_object_bytes=cfg.max_object_bytes,
                        dog_threshold=cfg.dog_threshold)
    compute = ActorPoolStrategy(size=pipeline_plan.actors)
    if pipeline_plan.pipeline == FUSED:
        return ds.map_batches(LabelActor, fn_constructor_kwargs=actor_kwargs, compute=compute, batch_size=1,
                              batch_format="pyarrow", num_cpus=pipeline_plan.cpus_per_actor, zero_copy_batch=True)
    bundle = load_bundle(cfg.model)
    # A memory request of its own also keeps Ray from fusing this stage into the actors.
    decoded = ds.map_batches(
        _decode_stage, batch_size=1, batch_format="pyarrow", num_cpus=1, memory=DECODE_TASK_MEMORY,
        zero_copy_batch=True, fn_kwargs=dict(size=bundle.input_size, policy=bundle.resize_policy,
                                             model_id=bundle.model_id, finished_box=finished_box,
                                             io_threads=cfg.io_threads, s3=cfg.s3,
                                             max_object_bytes=cfg.max_object_bytes))
    actor_kwargs["decode_threads"] = 1
    return decoded.map_batches(PredictActor, fn_constructor_kwargs=actor_kwargs, compute=compute, batch_size=1,
                               batch_format="pyarrow", num_cpus=pipeline_plan.cpus_per_actor,
                               num_gpus=pipeline_plan.gpus_per_actor, zero_copy_batch=True)


def run_pipeline(cfg: LabelConfig, run: LabelRun, items: Iterable[ItemData], stop: GracefulStop) -> PipelinePlan:
    """Label `items` (the listing, what is left of it) into `run`; returns the plan it ran with."""
    import ray
    from ray.data.exceptions import ExecutionTimeoutError

    pipeline_plan = plan(cfg, cluster_resources())
    log.debug("label plan: %s", pipeline_plan)
    _warn_if_no_room(pipeline_plan)
    finished_ref = ray.put(run.done_keys) if run.done_keys is not None else None
    feeder = Feeder(items, cfg.batch_size, cfg.queue_chunks, cfg.chunk_bytes).start()
    pbar = _progress(cfg)
    try:
        ds = build_dataset(cfg, pipeline_plan, feeder.queue, finished_ref)
        with _ray_data_quiet_on_stop():
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                for rows in _tables(batch):
                    run.add(rows)
                    _tick(pbar, feeder, rows.num_rows, run)
                stop.check()
    except ExecutionTimeoutError as exc:
        raise _no_progress(exc, pipeline_plan, run) from None
    finally:
        feeder.stop()
        if pbar is not None:
            pbar.close()
    if feeder.error is not None:
        raise feeder.error
    if not feeder.finished or run.seen != feeder.listed:
        raise JobError(f"run {run.run_id}: {feeder.listed} inputs listed but {run.seen} came back from the "
                       "pipeline; nothing was published. Rerun the same command: it resumes from the staged parts")
    return pipeline_plan


def _warn_if_no_room(pipeline_plan: PipelinePlan) -> None:
    """Say so at once when not even one predict actor fits in what the cluster has free: the run
    waits (for an autoscaler's node, or for whatever holds the CPUs to end) with no progress."""
    import ray

    free = ray.available_resources()
    short = [f"{need} {name}" for name, need in (("CPU", pipeline_plan.cpus_per_actor),
                                                 ("GPU", pipeline_plan.gpus_per_actor))
             if need and free.get(name, 0) < need]
    if short:
        log.warning("waiting for room: a predict actor needs %s, and the cluster has %s free (`ray status` shows "
                    "what holds them); the run goes on once they are free, or ends after Ray Data's no-progress "
                    "timeout", " and ".join(short),
                    " and ".join(f"{free.get(n, 0):g} {n}" for n in ("CPU", "GPU") if n in free or n == "CPU"))


class _NotAStop(logging.Filter):
    """Ray Data logs whatever leaves `iter_batches` as "Exception occurred in Ray Data or Ray Core
    internal code … please open an issue", with a traceback, before re-raising it. A stop is not
    that: `Stopped` is raised by the signal handler wherever the main thread is, often in Ray
    Data's wait for the next block (`breedlabel jobs stop`, a scheduler's SIGTERM)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not isinstance(sys.exc_info()[1], Stopped)


@contextlib.contextmanager
def _ray_data_quiet_on_stop() -> Iterator[None]:
    logger, quiet = logging.getLogger("ray.data.exceptions"), _NotAStop()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _no_progress(exc: Exception, pipeline_plan: PipelinePlan, run: LabelRun) -> JobError:
    """Ray Data gives up after `RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S` (30 min) without a block:
    almost always predict actors the cluster cannot place (another job, or a stalled run whose
    lease this one took over, holds the CPUs), so say that in one line, not Ray's traceback."""
    each = f"{pipeline_plan.cpus_per_actor} CPU" + (f", {pipeline_plan.gpus_per_actor} GPU"
                                                     if pipeline_plan.gpus_per_actor else "")
    seconds = str(exc).split("at least ", 1)[-1].split(" of", 1)[0] if "at least " in str(exc) else "too long"
    why = (f"the cluster did not give the {pipeline_plan.actors} predict actor(s) their resources ({each} each)"
           if not run.stats.images else f"a predict actor ({each}) or a task is stuck or lost its resources "
           f"({run.stats.images} images labelled before)")
    return JobError(f"run {run.run_id}: no progress for {seconds}: {why}. Another job or a stalled run may hold "
                    "them: see `ray status` and `breedlabel jobs list`, then rerun the same command; it resumes from "
                    "the staged parts")


def _progress(cfg: LabelConfig) -> console.Progress | None:
    return console.Progress(0, "labelling", report_total=False) if cfg.progress else None


def _tick(progress: console.Progress | None, feeder: Feeder, n: int, run: LabelRun) -> None:
    if progress is None:
        return
    progress.grow(max(feeder.listed, progress.done + n),
                  f"errors {run.stats.errors}" + ("" if feeder.finished else ", listing…"))
    progress.update(n)
