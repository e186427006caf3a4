"""Search training hyperparameters with Ray Tune; each trial is one distributed `train` run.

Each trial runs a driver function that builds the TensorflowTrainer of jobs.train_distributed
(with Tune's TuneReportCallback) and fits it: Ray Train V2's way of running under Tune.
ASHA stops trials whose validation top-1 lags at a rung; Optuna's TPE proposes new points
from finished ones, starting with the base config's own values. Outputs under --out:
results.csv / results.parquet (one row per trial, its best epoch), best_config.json (a full
TrainConfig for `breedlabel train --config`), best_trial.json, and with --final-train the
bundle of the best config trained on the full split. Subset workflow:
    breedlabel tune --data DOGS --classes 12 --space cpu --out /work/runs/tune12 ...
    breedlabel train --data DOGS --config /work/runs/tune12/best_config.json --out /work/runs/b120
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Iterator, Sequence

from core import options
from core import search_space
from core import storage as storage_uri
from core.config import PRESETS, TrainConfig, get_preset
from core.errors import ConfigError, JobError
from core.options import option
from core.stop import GracefulStop, Stopped, poll, sigint_handler_restored

log = logging.getLogger(__name__)

RESULTS_CSV = "results.csv"
RESULTS_PARQUET = "results.parquet"
BEST_CONFIG_FILE = "best_config.json"
BEST_TRIAL_FILE = "best_trial.json"
FINAL_BUNDLE_DIR = "bundle"
METRIC = "val_top1"
SEARCHERS = ("optuna", "random")


@dataclass(frozen=True)
class TuneConfig:
    """One search. Trial resources: `workers` Ray Train workers of cpus/gpus each."""

    space: str = option("default", "search space (core.search_space)", choices=sorted(search_space.SPACES))
    num_samples: int = option(8, "trials to run")
    max_concurrent: int = option(0, "trials side by side (0 = as many as the cluster's CPUs/GPUs fit)")
    workers: int = option(1, "Ray Train workers per trial")
    cpus_per_worker: float = option(1.0, "CPUs each worker holds")
    gpus_per_worker: float = option(0.0, "GPUs each worker holds")
    searcher: str = option("optuna", "how new trials are picked", choices=SEARCHERS)
    grace_period: int = option(1, "ASHA: epochs before a trial can be stopped")
    reduction_factor: float = option(2.0, "ASHA: keep 1/this of the trials at each rung")
    time_budget_s: float | None = option(None, "stop the search after this many seconds", type=float)
    storage: str | None = option(None, "Ray storage for the experiment and trial checkpoints (path or s3://; "
                                 "default <out>/ray)", type=str)
    run_name: str = option("tune", "experiment name under --storage (what --restore resumes)", aliases=("--name",))
    address: str | None = option(None, "Ray cluster address ('auto' = the running cluster); default: RAY_ADDRESS, "
                                 "else a new local Ray", type=str)
    num_cpus: int | None = option(None, "logical CPUs of a new local Ray (default: the machine's cores)", type=int)
    seed: int = option(0, "searcher seed")
    final_train: bool = option(False, "train the best config on the full training split and export it as "
                               "<out>/bundle", negatable=True)
    final_head_epochs: int | None = option(None, "--final-train head epochs (default: the tuned config's)", type=int)
    final_finetune_epochs: int | None = option(None, "--final-train fine-tune epochs (default: the tuned config's)",
                                               type=int)

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.max_concurrent < 0 or self.workers < 1:
            raise ConfigError("--num-samples and --workers must be >= 1, --max-concurrent >= 0")
        if self.searcher not in SEARCHERS:
            raise ConfigError(f"--searcher must be one of {SEARCHERS}, got {self.searcher!r}")
        if self.grace_period < 1 or self.reduction_factor <= 1:
            raise ConfigError("--grace-period must be >= 1 and --reduction-factor > 1")


class SearchInterrupted(JobError):
    """Tune ended the search before its trials did (a stop): resume it with --restore."""

    def __init__(self, finished: int, total: int, state: str, why: str = "interrupted"):
        self.finished, self.total, self.state = finished, total, state
        super().__init__(f"the search stopped after {finished} of {total} trials ({why}){_resume_hint(state)}")


def _resume_hint(state: str) -> str:
    return f"; resume it with the same options plus --restore (state in {state})"


# ---------------------------------------------------------------- search space -> Ray Tune

def to_tune_space(space: dict[str, search_space.Dim]) -> dict:
    from ray import tune

    def domain(d: search_space.Dim):
        if d.kind == search_space.CHOICE:
            return tune.choice(list(d.values))
        return tune.loguniform(d.low, d.high) if d.kind == search_space.LOGUNIFORM else tune.uniform(d.low, d.high)

    return {key: domain(d) for key, d in space.items()}


def _epochs_of(base: TrainConfig, params: dict) -> int:
    return planned_epochs(search_space.apply(base, params or {}))


def planned_epochs(cfg: TrainConfig) -> int:
    return sum(cfg.epochs(p) for p in cfg.phases())


def trial_driver(params: dict, *, base: dict, data: str, dist: dict) -> None:
    """One Tune trial: a distributed training run named after the trial (so a restored search
    resumes it from its own checkpoints), reporting each epoch to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from jobs import train_distributed  # Ray Train: inside the trial only

    cfg = search_space.apply(TrainConfig.from_dict(base), params)
    run = train_distributed.DistributedConfig(**{**dist, "run_name": f"trial-{tune.get_context().get_trial_id()}"})
    train_distributed.make_trainer(cfg, data, run, callbacks=[TuneReportCallback()]).fit()


def concurrency(tc: TuneConfig) -> int:
    """Trials side by side: what the cluster's GPUs (or CPUs) fit, capped by --max-concurrent."""
    import ray

    res = ray.cluster_resources()
    if tc.gpus_per_worker > 0:
        fit = int(res.get("GPU", 0) // (tc.workers * tc.gpus_per_worker))
    else:
        fit = int(res.get("CPU", 1) // (tc.workers * tc.cpus_per_worker + 0.1))
    fit = max(fit, 1)
    return min(fit, tc.max_concurrent) if tc.max_concurrent else fit


def _searcher(tc: TuneConfig, space: dict, base: TrainConfig):
    if tc.searcher == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(random_state=tc.seed)
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from core import console

    if not console.is_verbose():  # "A new study created in memory"
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    first = search_space.base_point(space, base)
    return OptunaSearch(points_to_evaluate=[first] if first else None, seed=tc.seed)


def make_tuner(tc: TuneConfig, base: TrainConfig, data: str, space: dict, storage: str,
               callbacks: Sequence = (), restore: bool = False):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from core import console
    from jobs.tune_callbacks import ReleaseEndedTrials, TrialProgress

    dist = {"workers": tc.workers, "cpus_per_worker": tc.cpus_per_worker, "gpus_per_worker": tc.gpus_per_worker,
            "storage": f"{storage.rstrip('/')}/{tc.run_name}-trials"}
    trainable = tune.with_resources(
        tune.with_parameters(trial_driver, base=base.to_dict(), data=str(data), dist=dist), {"CPU": 0.1})
    path = f"{storage.rstrip('/')}/{tc.run_name}"
    if restore:
        if not tune.Tuner.can_restore(path):
            raise ConfigError(f"--restore: no search to resume at {path}; check --storage and --run-name")
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    # stop_last_trials=False: a trial that reaches max_t ends by itself, its controller shutting
    # its workers down, instead of being killed at its last report
    scheduler = ASHAScheduler(max_t=max(planned_epochs(base), 1), grace_period=tc.grace_period,
                              reduction_factor=tc.reduction_factor, stop_last_trials=False)
    return tune.Tuner(
        trainable,
        param_space=to_tune_space(space),
        tune_config=tune.TuneConfig(metric=METRIC, mode="max", num_samples=tc.num_samples,
                                    max_concurrent_trials=concurrency(tc), search_alg=_searcher(tc, space, base),
                                    scheduler=scheduler, time_budget_s=tc.time_budget_s),
        run_config=tune.RunConfig(
            name=tc.run_name, storage_path=storage, verbose=None if console.is_verbose() else 0,  # our lines instead
            callbacks=[ReleaseEndedTrials(), TrialProgress(tc.num_samples, METRIC, partial(_epochs_of, base)),
                       *callbacks]),
    )


# ---------------------------------------------------------------- results
def results_table(grid, base: TrainConfig):
    """One row per trial at its best epoch, with status and whether ASHA stopped it early."""
    import pandas as pd

    rows = []
    for r in grid:
        history = r.metrics_dataframe  # every epoch Tune saw (the checkpoints stay with Ray Train)
        metrics = r.metrics or {}
        if history is not None and METRIC in history and history[METRIC].notna().any():
            metrics = history.loc[history[METRIC].idxmax()].to_dict()
        planned = planned_epochs(search_space.apply(base, r.config)) if r.config else None
        iters = (r.metrics or {}).get("training_iteration")
        row = {"trial_id": (r.metrics or {}).get("trial_id"), "status": "ERROR" if r.error else "OK",
               METRIC: metrics.get(METRIC), "val_top3": metrics.get("val_top3"), "best_epoch": metrics.get("epoch"),
               "epochs_run": iters, "epochs_planned": planned,
               "early_stopped": bool(iters is not None and planned and iters < planned and not r.error),
               "time_s": (r.metrics or {}).get("time_total_s")}
        row.update({f"config/{k}": v for k, v in (r.config or {}).items()})
        rows.append(row)
    return pd.DataFrame(rows).sort_values(METRIC, ascending=False, na_position="last").reset_index(drop=True)


def write_outputs(out: str, table, best_cfg: TrainConfig, best: dict) -> None:
    from core import storage

    storage.write_bytes(storage.join(out, RESULTS_CSV), table.to_csv(index=False).encode())
    buf = io.BytesIO()
    table.to_parquet(buf, index=False)
    storage.write_bytes(storage.join(out, RESULTS_PARQUET), buf.getvalue())
    storage.write_bytes(storage.join(out, BEST_CONFIG_FILE), json.dumps(best_cfg.to_dict(), indent=1).encode())
    storage.write_bytes(storage.join(out, BEST_TRIAL_FILE), json.dumps(best, indent=1, default=str).encode())


def run_tune(tc: TuneConfig, base: TrainConfig, data: str, out: str, *, space: dict | None = None,
             restore: bool = False, callbacks: Sequence = ()) -> dict:
    """Search, write the table and best config, optionally train the best config in full.
    Raises Stopped when a signal (or Tune on a Ctrl-C) ended the search: `restore=True` resumes it."""
    from core import console
    from jobs import ray_session

    space = space if space is not None else search_space.get_space(tc.space)
    search_space.check_space(space, base)
    out = storage_uri.normalize_uri(out)  # Ray Tune's storage is a URI: a relative path is refused deep inside
    # the trials' own logs: with -v; the dashboard for Train V2's cleaner (see jobs.train_distributed)
    storage = storage_uri.normalize_uri(tc.storage) if tc.storage else f"{out.rstrip('/')}/ray"
    state = f"{storage}/{tc.run_name}"
    stop = GracefulStop(polled=True, sigterm_as_sigint=True,  # Tune and Ray Train end their fit on SIGINT
                        announce=lambda why: print(f"breedlabel tune: {why}: ending the trials{_resume_hint(state)}",
                                                   file=sys.stderr, flush=True))
    try:  # SIGTERM (a scheduler, `breedlabel jobs stop`) ends the search as Ctrl-C does: one line, exit 1
        with stop:
            ray_session.connect(tc.address, num_cpus=tc.num_cpus, dashboard=True, quiet=not console.is_verbose(),
                                stop=stop)
            return _search(tc, base, data, out, space, storage, restore, callbacks)
    except SearchInterrupted as exc:  # Tune's SIGINT handler took it (a SIGTERM would have been ours first)
        why = stop.reason or "stopped by SIGINT"
        raise Stopped(str(SearchInterrupted(exc.finished, exc.total, exc.state, why))) from None
    except BaseException as exc:
        if (why := stop.why(exc, library_exits=True)) is None:
            raise
        raise Stopped(f"the search {why}{_resume_hint(state)}") from None


class _TuneStopLines(logging.Filter):
    """Tune's own lines on a stop ("Press CTRL+C … to skip", "Resume experiment with:
    Tuner.restore(…)", then "Failed to fetch metrics" of the trial it cut short) speak to a Python
    caller; the CLI's one line says `--restore` (with -v: all). Seeing them is also how a search
    knows Tune ended it on a signal: its ResultGrid counts the cut trial as terminated."""

    def __init__(self) -> None:
        super().__init__()
        self.interrupted = False

    def filter(self, record: logging.LogRecord) -> bool:
        from core import console

        message = record.getMessage()
        if message.startswith("Experiment has been interrupted"):
            self.interrupted = True
        ours = message.startswith(("Stop signal received", "Experiment has been interrupted")) \
            or (self.interrupted and message.startswith("Failed to fetch metrics"))
        return console.is_verbose() or not ours


@contextlib.contextmanager
def _tune_stop_lines_dropped() -> Iterator[_TuneStopLines]:
    lines = _TuneStopLines()
    loggers = [logging.getLogger(n) for n in ("ray.tune.tune", "ray.tune.analysis.experiment_analysis")]
    for logger in loggers:
        logger.addFilter(lines)
    try:
        yield lines
    finally:
        for logger in loggers:
            logger.removeFilter(lines)


def _search(tc: TuneConfig, base: TrainConfig, data: str, out: str, space: dict, storage: str, restore: bool,
            callbacks: Sequence) -> dict:
    from core import console
    from jobs.tune_callbacks import release_search

    t0 = time.time()
    # Tune's table goes to tune.log (ours is tune_callbacks'); Tune leaves its SIGINT handler installed
    with console.stdout_to_log("tune.log"), _tune_stop_lines_dropped() as tune_stop, sigint_handler_restored():
        grid = make_tuner(tc, base, data, space, storage, callbacks, restore).fit()
    release_search(grid)  # an interrupted search's workers: free them for a restore or --final-train
    short = grid.num_terminated + grid.num_errors < tc.num_samples and tc.time_budget_s is None
    if tune_stop.interrupted or short:  # a trial Tune cut short counts as terminated: count those that reported
        finished = sum(1 for r in grid if r.error is not None or METRIC in (r.metrics or {}))
        raise SearchInterrupted(finished, tc.num_samples, f"{storage}/{tc.run_name}")
    poll()  # a SIGTERM taken by our handler once Tune's was gone: no outputs from a stopped search
    table = results_table(grid, base)
    ok = table.dropna(subset=[METRIC])
    if ok.empty:
        raise JobError(f"no trial of {storage}/{tc.run_name} reported {METRIC}; see the trial errors above")
    best_row = ok.iloc[0]
    params = {k[len("config/"):]: v for k, v in best_row.items() if k.startswith("config/") and _set(v)}
    # Hyperparameters only: the class subset used for searching is not part of the best config.
    best_cfg = search_space.apply(base, _plain(params)).replace(classes=None)
    best = {"trial_id": best_row["trial_id"], METRIC: float(best_row[METRIC]), "params": _plain(params),
            "tuned_on_classes": base.classes, "trials": len(table), "search_s": round(time.time() - t0, 1),
            "early_stopped": int(table["early_stopped"].sum())}
    write_outputs(out, table, best_cfg, best)
    log.info("best trial %s: %s %.4f; wrote %s", best["trial_id"], METRIC, best[METRIC], out)
    if tc.final_train:
        best["final"] = final_train(tc, best_cfg, data, out, storage)
        write_outputs(out, table, best_cfg, best)
    return best


def _set(v: Any) -> bool:
    return not (isinstance(v, float) and math.isnan(v))


def _plain(params: dict) -> dict:
    """numpy scalars from the dataframe -> plain Python for TrainConfig and JSON."""
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in params.items()}


def final_train(tc: TuneConfig, cfg: TrainConfig, data: str, out: str, storage: str) -> dict:
    from jobs.train_distributed import DistributedConfig, run_distributed

    changes = {"head_epochs": tc.final_head_epochs, "finetune_epochs": tc.final_finetune_epochs}
    cfg = cfg.replace(**{k: v for k, v in changes.items() if v is not None})
    dist = DistributedConfig(workers=tc.workers, cpus_per_worker=tc.cpus_per_worker,
                             gpus_per_worker=tc.gpus_per_worker, storage=storage, run_name=f"{tc.run_name}-final")
    done = run_distributed(cfg, data, dist, out=f"{out.rstrip('/')}/{FINAL_BUNDLE_DIR}", progress=True)
    return {"bundle": f"{out.rstrip('/')}/{FINAL_BUNDLE_DIR}", "top1": done.card_metrics.get("top1"),
            "top3": done.card_metrics.get("top3")}


# ---------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    p = parser
    p.add_argument("--data", required=True, help="folder-per-class dataset")
    p.add_argument("--out", required=True, help="results folder (path or s3://): table, best config, bundle")
    p.add_argument("--preset", default="mobilenet_v2", choices=sorted(PRESETS), help="base TrainConfig")
    p.add_argument("--config", default=None, help="base TrainConfig JSON/YAML file (instead of --preset)")
    p.add_argument("--restore", action="store_true", help="resume the interrupted search --storage/--run-name")
    # the base config's fields a search is often sized by (as `breedlabel train` names them)
    options.add_options(p, TrainConfig, preset=get_preset("mobilenet_v2"), preset_name="preset mobilenet_v2",
                        only=("classes", "weights", "head_epochs", "finetune_epochs"))
    options.add_options(p, TuneConfig)


def run(args: argparse.Namespace) -> int:
    from jobs.train import config_from_args  # the base config: --preset or --config, then the options given

    tc = TuneConfig(**options.values(args, TuneConfig))
    best = run_tune(tc, config_from_args(args).with_absolute_paths(), storage_uri.normalize_uri(args.data), args.out,
                    restore=args.restore)
    print(json.dumps(best, default=str))
    return 0


if __name__ == "__main__":  # `python -m jobs.tune …`: what `breedlabel submit tune` runs on the cluster
    import sys

    from jobs.cli import main

    sys.exit(main(["tune", *sys.argv[1:]]))
