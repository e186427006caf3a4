"""Train a breed classifier on a folder-per-class dataset and export a bundle.

Single process (core.train.train); options override the chosen preset, whose values are the
defaults shown here. The bundle's card carries the resolved config, the data fingerprint,
validation metrics {top1, top3, per_class} and the per-epoch history.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from pathlib import Path

from core import options
from core.config import PRESETS, TrainConfig, get_preset
from core.errors import ConfigError
from core.stop import GracefulStop, Stopped
from jobs.train_distributed import DistributedConfig

log = logging.getLogger(__name__)

DEFAULT_PRESET = "mobilenet_v2"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    p = parser
    p.add_argument("--data", required=True, help="folder-per-class dataset (e.g. Stanford Dogs Images/)")
    p.add_argument("--out", required=True, help="bundle destination: a new local dir, file:// or s3:// URI")
    p.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS),
                   help="named defaults the options below override")
    p.add_argument("--config", default=None,
                   help="a config JSON/YAML file (e.g. tune's best_config.json) as the defaults, instead of --preset")
    p.add_argument("--checkpoint-dir", default=None,
                   help="per-epoch weights, history.json, train_config.json (default: <out>.run when --out is local)")
    # unset options keep the preset's (or --config's) value, shown in brackets
    options.add_options(p, TrainConfig, preset=get_preset(DEFAULT_PRESET), preset_name=f"preset {DEFAULT_PRESET}")
    options.add_options(p.add_argument_group("over Ray Train workers (with --workers)"), DistributedConfig,
                        preset=DistributedConfig(), preset_name="with --workers")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    cfg = TrainConfig.from_file(args.config) if getattr(args, "config", None) else get_preset(args.preset)
    return cfg.replace(**options.values(args, TrainConfig, unset=False))


def run(args: argparse.Namespace) -> int:
    from core import console

    cfg = config_from_args(args)
    ckpt = args.checkpoint_dir
    if ckpt is None and args.workers is None and "://" not in args.out:  # the feature cache, to resume
        ckpt = str(Path(args.out).with_name(Path(args.out).name + ".run"))
    _check_destinations(args.out, ckpt)
    if args.workers is not None:  # over Ray Train workers: the same command on a laptop or a cluster
        from jobs.train_distributed import run_from_args  # Ray Train: only for a distributed run

        return run_from_args(cfg, DistributedConfig(**options.values(args, DistributedConfig, unset=False)), args)
    stop = GracefulStop(polled=True)  # polled: TensorFlow can swallow the Stopped a signal raises
    step = "training"
    try:  # SIGTERM (a scheduler, `breedlabel jobs stop`) ends the run like Ctrl-C: one line, exit 1
        with stop, contextlib.redirect_stdout(sys.stderr):  # Keras' epoch lines: progress, not stdout
            console.import_tensorflow(Path(ckpt) / "logs" if ckpt and "://" not in ckpt else None)
            from core import datasets
            from core.train import export_trained, train  # TensorFlow: only once a run starts (`--help` stays fast)

            folder = datasets.select_classes(datasets.discover(args.data), cfg.classes)
            t0 = time.time()
            result = train(cfg, folder, checkpoint_dir=ckpt)
            stop.check()
            result.extras.setdefault("timings", {})["total_s"] = round(time.time() - t0, 1)
            step = "export"
            export_trained(result, args.out, folder)  # removes what it wrote if a stop lands in it
    except BaseException as exc:
        if (why := stop.why(exc)) is None:
            raise
        kept = f"; rerunning the same command reuses the features cached in {ckpt}" if _has_features(ckpt) else ""
        during = " during the export" if step == "export" else ""
        raise Stopped(f"training {why}{during}, nothing exported{kept}") from None
    stop.warn_if_finished_anyway(f"the export finished; the bundle at {args.out} is complete")
    card = {k: ({kk: vv for kk, vv in v.items() if kk != "rows"} if k == "head_init" else v)  # rows: in the card
            for k, v in result.card.items()}
    summary = {"out": args.out, "top1": round(result.metrics["top1"], 4), "top3": round(result.metrics["top3"], 4),
               **{k: v for k, v in result.extras.items() if k != "timings"}, **card,
               "timings": result.extras["timings"]}
    print(json.dumps(summary))
    return 0


def _has_features(checkpoint_dir: str | None) -> bool:
    """Whether a stopped run left features a rerun reuses (the stop line says so only then). The
    name is core.feature_cache's `features-<key>.npz`, not imported: it loads TensorFlow."""
    return bool(checkpoint_dir) and "://" not in checkpoint_dir and any(Path(checkpoint_dir).glob("features-*.npz"))


def _check_destinations(out: str, checkpoint_dir: str | None) -> None:
    """Where the bundle and the checkpoints go, checked before training rather than after it."""
    from core import bundle, storage

    bundle.check_export_target(out)
    if checkpoint_dir and "://" not in checkpoint_dir:
        storage.check_writable_folder(checkpoint_dir, "checkpoints (--checkpoint-dir)")
        if "://" not in out:
            ck, bundle_dir = Path(checkpoint_dir).expanduser().resolve(), Path(out).expanduser().resolve()
            if ck == bundle_dir or bundle_dir in ck.parents:
                raise ConfigError(f"--checkpoint-dir {checkpoint_dir}: is inside the bundle's folder --out {out}; "
                                  "the export needs that folder to itself: give a checkpoint folder beside it")


if __name__ == "__main__":  # `python -m jobs.train …`: what `breedlabel submit train` runs on the cluster
    from jobs.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
