"""One training run data-parallel over N Ray Train workers (TensorflowTrainer + MultiWorkerMirroredStrategy).

The per-worker loop reuses core's training pieces (core.train_data.build_datasets,
core.train_model.build_model / compile_for_phase / run_phase): no second training loop. What
this module adds is the Ray part:

- Sharding: tf.data, sharded by file *before* decoding. Each worker keeps every N-th path of
  the seeded split (`shard_folder`) with auto-sharding OFF, so it decodes, caches and
  augments only its own 1/N of the images; the dataset is batched at the global batch and
  tf.distribute rebatches it, so each worker steps on global/N images. Every worker runs
  the same explicit `steps` per epoch over its repeated shard, so no worker runs dry.
  Validation is the whole split under auto-shard DATA: every element counted exactly once,
  metrics all-reduced. Not Ray Data: core.train already owns the decode/augment graph, and
  on a 2-core box a second streaming runtime per epoch costs more than it saves.
- Checkpoints: every epoch every worker writes the weights (the variable reads are
  collectives), rank 0 reports them with `ray.train.report` plus the phase/epoch state.
  `FailureConfig(max_failures)` restarts a worker group that lost a worker; the loop then
  resumes from `ray.train.get_checkpoint()` at the next epoch (weights + LR-schedule step;
  the optimizer's moment estimates restart). Re-running with the same `name` and `storage`
  resumes an interrupted run the same way.
- Both phases train on the fly here (`head_feature_views` and `finetune_cached` are the
  single-process CPU shortcuts of core.feature_cache; caching per worker would need a collective
  predict). For the same reason `head_init imagenet` picks its rows on the driver (one backbone
  pass over the training photos) and every worker applies them to its fresh head.
- Export: the best reported checkpoint (by val top-1) is loaded into a plain model on the
  driver, measured on the validation split and exported by core.train.export_trained, as a
  single-process run is.

core's training modules import TensorFlow at their top, so they are imported inside the
functions that run on workers or at export, never when the CLI starts.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from core import storage
from core.config import HEAD_INIT_IMAGENET, PHASE_FINETUNE, PHASE_HEAD, TrainConfig
from core.console import VERBOSE_ENV
from core.errors import ConfigError, JobError
from core.options import option
from core.stop import GracefulStop, Stopped, poll, sigint_handler_restored
from jobs import ray_session

log = logging.getLogger(__name__)

WEIGHTS_FILE = "weights.h5"
STATE_FILE = "state.json"
METRIC = "val_top1"
# reported each epoch: the placement group holding this run's workers, so a Tune driver can give
# its resources back when the trial ends (jobs.tune.ReleaseEndedTrials)
PG_METRIC = "placement_group"
WORKER_ENV = {"TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
DEFAULT_STORAGE = os.path.expanduser("~/ray_results/breedlabel")


@dataclass(frozen=True)
class DistributedConfig:
    """How one run spreads over Ray: the same command on a laptop and on a GPU cluster."""

    workers: int = option(1, "train over N Ray Train workers (MultiWorkerMirroredStrategy); unset = one process")
    gpus_per_worker: float = option(0.0, "GPUs each worker holds")
    cpus_per_worker: float = option(1.0, "CPUs each worker holds")
    storage: str = option(DEFAULT_STORAGE, "checkpoint storage (path or s3://); rerun with --run-name to resume")
    run_name: str | None = option(None, "run name under --storage: the same name resumes that run", type=str)
    max_failures: int = 3
    keep_checkpoints: int = 2

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {self.workers}")
        if self.gpus_per_worker < 0 or self.cpus_per_worker <= 0:
            raise ConfigError("--gpus-per-worker must be >= 0 and --cpus-per-worker > 0")
        if self.keep_checkpoints < 1:
            raise ConfigError("keep_checkpoints must be >= 1")


@dataclass
class DistributedResult:
    metrics: dict  # the best checkpoint's reported metrics
    last_metrics: dict  # the last epoch's
    checkpoint_path: str
    run_path: str
    bundle: Any = None  # core.bundle.Bundle when exported
    card_metrics: dict = field(default_factory=dict)


# ---------------------------------------------------------------- on each worker
def shard_folder(folder, index: int, count: int):
    """Every `count`-th image starting at `index`: a worker's share of a seeded split."""
    if count <= 1:
        return folder
    return replace(folder, paths=list(folder.paths[index::count]), labels=folder.labels[index::count])


def _resume_plan(cfg: TrainConfig, state: dict | None) -> list[tuple[str, int]]:
    """(phase, first epoch) still to run, given the last checkpoint's state."""
    plan = [(p, 0) for p in cfg.phases()]
    if not state:
        return plan
    names = [p for p, _ in plan]
    if state["phase"] not in names:
        return plan
    i = names.index(state["phase"])
    nxt = state["phase_epoch"] + 1
    done = state.get("phase_done") or nxt >= cfg.epochs(state["phase"])
    return plan[i + 1:] if done else [(state["phase"], nxt)] + plan[i + 1:]


def _make_reporter(model, phase: str, offset: int, first_global: int, rank: int, resumed_at: int, global_batch: int):
    """Keras callback: every worker saves the weights, rank 0 reports them as the checkpoint."""
    import ray.train
    import tf_keras as keras

    class ReportCheckpoint(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = self.t_val = time.perf_counter()

        def on_test_begin(self, logs=None):
            self.t_val = time.perf_counter()  # training part of the epoch ends here

        def on_epoch_end(self, epoch, logs=None):
            train_s = max(self.t_val - self.t0, 1e-9)
            phase_epoch = offset + epoch
            state = {"phase": phase, "phase_epoch": phase_epoch, "epoch": first_global + epoch,
                     "phase_done": bool(model.stop_training)}
            tmp = tempfile.mkdtemp(prefix="ckpt-")
            model.save_weights(os.path.join(tmp, WEIGHTS_FILE))
            Path(tmp, STATE_FILE).write_text(json.dumps(state))
            metrics = {k: float(v) for k, v in (logs or {}).items()}
            metrics.update(state, resumed_at=resumed_at, train_s=train_s,  # resumed_at: 0 unless resumed
                           images_per_s=self.params["steps"] * global_batch / train_s, **_placement_group())
            ckpt = ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None
            ray.train.report(metrics, checkpoint=ckpt)

    return ReportCheckpoint()


def _placement_group() -> dict:
    """{PG_METRIC: hex id} of the placement group this worker runs in ({} outside one)."""
    from ray.util.placement_group import get_current_placement_group

    pg = get_current_placement_group()
    return {PG_METRIC: pg.id.hex()} if pg is not None else {}


def _restore(model, cfg: TrainConfig) -> dict | None:
    import ray.train

    ckpt = ray.train.get_checkpoint()
    return None if ckpt is None else load_checkpoint(model, cfg, ckpt)


def load_checkpoint(model, cfg: TrainConfig, checkpoint) -> dict:
    """Load a reported checkpoint's weights into `model`, as saved in its phase; returns its state."""
    from core.train_model import load_phase_weights

    with checkpoint.as_directory() as d:
        state = json.loads(Path(d, STATE_FILE).read_text())
        load_phase_weights(model, cfg, state["phase"], os.path.join(d, WEIGHTS_FILE))
    return state


def _setup_tf(cpus: float):
    for key, value in WORKER_ENV.items():
        os.environ.setdefault(key, value)
    from core import console

    console.quiet_libraries()  # e.g. one "Collective all_reduce" INFO line per step and worker
    if not console.is_verbose():  # "Checkpoint successfully created", "Reporting training result" each epoch
        logging.getLogger("ray.train").setLevel(logging.WARNING)
    with console.tensorflow_startup():
        import tensorflow as tf

        threads = max(1, int(cpus))
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(min(2, threads))
        # Before any other TF op: the strategy reads TF_CONFIG, which Ray Train set.
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    return tf, strategy


def _worker_datasets(tf, cfg: TrainConfig, train_set, val_set, rank: int, world: int):
    from core.train_data import build_datasets, steps_per_epoch  # TensorFlow: on the worker only

    global_batch = cfg.batch_size
    train_ds, _ = build_datasets(cfg, shard_folder(train_set, rank, world), val_set, global_batch)
    _, val_ds = build_datasets(cfg, train_set, val_set, global_batch)
    off, data = tf.data.Options(), tf.data.Options()
    off.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    data.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    steps = steps_per_epoch(cfg, len(train_set.paths), global_batch)
    return train_ds.repeat().with_options(off), val_ds.with_options(data), steps


def train_loop_per_worker(config: dict) -> None:
    """What each Ray Train worker runs: both phases of core.train, resumable per epoch."""
    tf, strategy = _setup_tf(config["cpus_per_worker"])
    import ray.train
    import tf_keras as keras

    from core.train_data import split_data  # TensorFlow: on the worker only
    from core.train_model import TrainRun, build_model, compile_for_phase, phase_callbacks, run_phase, setup_precision

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = TrainConfig.from_dict(config["train_config"])
    keras.utils.set_random_seed(cfg.seed)
    setup_precision(cfg)
    train_set, val_set = split_data(cfg, config["data"])
    train_ds, val_ds, steps = _worker_datasets(tf, cfg, train_set, val_set, rank, world)
    with strategy.scope():
        model = build_model(cfg, len(train_set.classes))
    state = _restore(model, cfg)
    if state is None and config.get("head_rows") is not None:
        from core.head_init import apply_rows

        apply_rows(model, cfg.backbone, cfg.weights, config["head_rows"])
    plan = _resume_plan(cfg, state)
    if state:
        log.info("rank %d resumed after %s epoch %d; plan %s", rank, state["phase"], state["phase_epoch"], plan)
    extra: Callable[[int], list] | None = config.get("worker_callbacks")
    global_epoch = resumed_at = state["epoch"] + 1 if state else 0
    run = TrainRun(cfg, train_set, val_set)  # no checkpoint dir: Ray Train checkpoints (the reporter)
    for phase, start in plan:
        with strategy.scope():
            compile_for_phase(model, cfg, phase, steps)
            if start:
                model.optimizer.iterations.assign(start * steps)  # LR schedule carries on
        remaining = cfg.replace(**{f"{phase}_epochs": cfg.epochs(phase) - start})
        cbs = phase_callbacks(run, phase)  # early stopping, best-weights restore
        cbs.append(_make_reporter(model, phase, start, global_epoch, rank, resumed_at, cfg.batch_size))
        cbs += extra(rank) if extra else []
        hist = run_phase(model, remaining, phase, train_ds, val_ds, cbs, steps=steps, verbose=2 if rank == 0 else 0)
        global_epoch += len(next(iter(hist.values()), []))


# ---------------------------------------------------------------- on the driver
def make_trainer(cfg: TrainConfig, data: str, dist: DistributedConfig, *, callbacks: Sequence = (),
                 worker_callbacks: Callable[[int], list] | None = None, head_rows: Sequence[int] | None = None):
    """A TensorflowTrainer for one run; `callbacks` are Ray Train UserCallbacks (e.g. Tune's).
    With head_init imagenet every worker starts its head from the same ImageNet rows, picked here
    with one backbone pass over the training photos (or given as `head_rows`)."""
    if cfg.head_init == HEAD_INIT_IMAGENET and head_rows is None:
        from core.train import head_init_rows  # TensorFlow: only for this

        head_rows, _ = head_init_rows(cfg, data)
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    resources = {"CPU": dist.cpus_per_worker}
    if dist.gpus_per_worker:
        resources["GPU"] = dist.gpus_per_worker
    loop_config = {"train_config": cfg.to_dict(), "data": str(data), "cpus_per_worker": dist.cpus_per_worker,
                   "worker_callbacks": worker_callbacks, "head_rows": head_rows}
    return TensorflowTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=dist.workers, use_gpu=dist.gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=dist.run_name or new_run_name(),
            storage_path=dist.storage,
            failure_config=FailureConfig(max_failures=dist.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=dist.keep_checkpoints,
                                               checkpoint_score_attribute=METRIC, checkpoint_score_order="max"),
            callbacks=list(callbacks),
            worker_runtime_env={"env_vars": {**WORKER_ENV, VERBOSE_ENV: os.environ.get(VERBOSE_ENV, "0")}},
        ),
    )


def best_checkpoint(result) -> tuple[Any, dict]:
    """(checkpoint, metrics) with the highest val top-1 among those Ray kept."""
    if result.error:
        raise JobError(f"distributed training failed: {result.error}")
    kept = [(c, m) for c, m in (result.best_checkpoints or []) if METRIC in m]
    if not kept:
        raise JobError(f"training at {result.path} reported no checkpoint with {METRIC}; "
                       "check that every phase has at least one epoch")
    return max(kept, key=lambda cm: cm[1][METRIC])


def export_checkpoint(checkpoint, cfg: TrainConfig, data: str, out: str, dist: DistributedConfig,
                      head_init: dict | None = None):
    """Load a reported checkpoint into a plain model, measure it on the validation split (the
    test-time average kept only where it measures better, as a single-process run) and export
    the bundle (core.train.export_trained); returns (bundle, metrics)."""
    from core.train import export_trained, measure_for_export  # TensorFlow: only at export
    from core.train_data import build_datasets, split_data
    from core.train_model import build_model

    train_set, val_set = split_data(cfg, data)
    model = build_model(cfg.without_weights(), len(train_set.classes))
    load_checkpoint(model, cfg, checkpoint)
    _, val_ds = build_datasets(cfg, train_set, val_set)
    result = measure_for_export(model, cfg, train_set, val_set, val_ds, head_init=head_init)
    if head_init is not None:
        result.card["head_init"] = head_init
    return export_trained(result, out, train_set, distributed=asdict(dist)), result.metrics


def new_run_name() -> str:
    return f"train-{time.strftime('%Y%m%d-%H%M%S')}"


def run_distributed(cfg: TrainConfig, data: str, dist: DistributedConfig, out: str | None = None, *,
                    worker_callbacks: Callable[[int], list] | None = None, progress: bool = False
                    ) -> DistributedResult:
    """Fit over `dist.workers` workers, then export the best checkpoint to `out` (if given).
    progress: log one line per epoch here (jobs.train_progress), for a driver whose workers'
    own output is not shown."""
    t0 = time.time()
    head_rows = head_init = None
    if cfg.head_init == HEAD_INIT_IMAGENET:  # picked once, for the workers and the card
        from core.train import head_init_rows  # TensorFlow: only for this

        head_rows, head_init = head_init_rows(cfg, data)
    with contextlib.ExitStack() as stack:
        callbacks = []
        if progress:
            from jobs.train_progress import printed_progress

            epochs = {PHASE_HEAD: cfg.head_epochs, PHASE_FINETUNE: cfg.finetune_epochs}
            callbacks.append(stack.enter_context(printed_progress(epochs)))
        with sigint_handler_restored():  # Ray Train leaves its own installed
            result = make_trainer(cfg, data, dist, callbacks=callbacks, worker_callbacks=worker_callbacks,
                                  head_rows=head_rows).fit()
    poll()  # a fit aborted by SIGINT/SIGTERM returns: nothing more to do (nor export)
    checkpoint, metrics = best_checkpoint(result)
    log.info("trained in %.0f s over %d worker(s); best %s %.4f at %s epoch %s", time.time() - t0,
             dist.workers, METRIC, metrics[METRIC], metrics.get("phase"), metrics.get("phase_epoch"))
    done = DistributedResult(metrics=dict(metrics), last_metrics=dict(result.metrics or {}),
                             checkpoint_path=checkpoint.path, run_path=result.path)
    if out:
        done.bundle, done.card_metrics = export_checkpoint(checkpoint, cfg, data, out, dist, head_init)
    return done


def _saved_a_checkpoint(dist: DistributedConfig) -> bool:
    """Whether the run under --storage holds a checkpoint a rerun resumes from (Ray Train saves each in a
    `checkpoint_*` folder), so a stop says "resume" only where there is something to resume. True when
    the storage cannot be listed: the hint is then the safe one."""
    import pyarrow.fs as pafs

    try:
        fs, root = storage.get_filesystem(storage.join(storage.normalize_uri(dist.storage), dist.run_name))
        found = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except Exception:  # noqa: BLE001 - S3 unreachable or no credentials: keep the resume hint
        return True
    return any(f.type == pafs.FileType.Directory and f.base_name.startswith("checkpoint_") for f in found)


def run_from_args(cfg: TrainConfig, dist: DistributedConfig, args) -> int:
    """`breedlabel train --workers N …`: fit, export, print the summary line."""
    from core import console

    dist = replace(dist, run_name=dist.run_name or new_run_name())  # named here: the stop message resumes it
    stop = GracefulStop(polled=True, sigterm_as_sigint=True)  # Ray Train's SIGINT handler aborts its fit
    try:  # SIGTERM (a scheduler, `breedlabel jobs stop`) ends the run as Ctrl-C does: one line, exit 1
        with stop:
            console.import_tensorflow()  # here too: Ray Train's TensorflowTrainer imports it
            # the dashboard stays: Train V2's placement-group cleaner asks its State API whether a controller
            # died (jobs.tune_callbacks gives a stopped trial's resources back when it cannot)
            ray_session.connect(dashboard=True, quiet=not console.is_verbose(), stop=stop)  # workers' output: -v
            t0 = time.time()
            # absolute paths: the workers run in other working directories
            done = run_distributed(cfg.with_absolute_paths(), storage.normalize_uri(args.data), dist, out=args.out,
                                   progress=True)
    except BaseException as exc:
        if (why := stop.why(exc, library_exits=True)) is None:
            raise
        if not _saved_a_checkpoint(dist):
            raise Stopped(f"training {why} before its first checkpoint, nothing exported; rerun the command "
                          "to start it again") from None
        raise Stopped(f"training {why}, nothing exported; to resume from its last checkpoint, rerun with "
                      f"--storage {dist.storage} --run-name {dist.run_name}") from None
    stop.warn_if_finished_anyway(f"the export finished; the bundle at {args.out} is complete")
    print(json.dumps({"out": args.out, "top1": round(done.card_metrics["top1"], 4),
                      "top3": round(done.card_metrics["top3"], 4), "workers": dist.workers,
                      "best_epoch": done.metrics.get("epoch"), "run": done.run_path,
                      "total_s": round(time.time() - t0, 1)}))
    return 0
