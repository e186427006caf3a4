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

from core.config import PRESETS, TrainConfig, get_preset

log = logging.getLogger(__name__)

DEFAULT_PRESET = "mobilenet_v2"
# option -> TrainConfig field (None-valued options leave the preset's value)
_OVERRIDES = {
    "backbone": "backbone", "weights": "weights", "classes": "classes", "per_class": "per_class",
    "input_size": "input_size", "batch_size": "batch_size", "epochs": "head_epochs",
    "finetune_epochs": "finetune_epochs", "lr": "head_lr", "finetune_lr": "finetune_lr",
    "finetune_layers": "finetune_layers", "feature_views": "head_feature_views", "view_kind": "head_view_kind",
    "dense_units": "dense_units", "dropout": "dropout", "label_smoothing": "label_smoothing",
    "patience": "early_stopping_patience", "val_fraction": "val_fraction", "seed": "seed", "tta_flip": "tta_flip",
    "tta_sizes": "tta_sizes", "finetune_cached": "finetune_cached", "max_steps_per_epoch": "max_steps_per_epoch",
}


# what each typed option does, in the words of the flags (the config field may be named otherwise)
_HELP = {
    "classes": "train on the first N classes only (none = all)",
    "per_class": "use at most N photos of each class, the first by file path (none = all)",
    "input_size": "backbone input size in px (none = the backbone's native size)",
    "batch_size": "images per training step",
    "epochs": "phase 1 epochs: the head on the frozen backbone",
    "finetune_epochs": "phase 2 epochs: the top --finetune-layers of the backbone with the head",
    "lr": "phase 1 peak learning rate",
    "finetune_lr": "phase 2 peak learning rate",
    "finetune_layers": "backbone layers phase 2 trains, counted from the top (-1 = all, 0 = skip phase 2)",
    "feature_views": "cache the frozen features of N views of each photo once and train the head on those "
                     "(0 = decode and augment every epoch)",
    "dense_units": "hidden units in the head (0 = a linear head)",
    "dropout": "dropout before the head's output layer",
    "label_smoothing": "label smoothing of the cross-entropy loss",
    "patience": "stop a phase after N epochs without a better validation top-1",
    "val_fraction": "share of each class held out for validation",
    "seed": "seed of the split, the augmentation and the weights",
    "max_steps_per_epoch": "cap on steps per epoch, for smoke runs (none = the whole split)",
}


def _preset_default(field_name: str):
    return getattr(get_preset(DEFAULT_PRESET), field_name)


def _shown(value) -> str:
    return "none" if value is None else str(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    p = parser
    p.add_argument("--data", required=True, help="folder-per-class dataset (e.g. Stanford Dogs Images/)")
    p.add_argument("--out", required=True, help="bundle destination: a new local dir, file:// or s3:// URI")
    p.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS),
                   help="named defaults the options below override")
    p.add_argument("--checkpoint-dir", default=None,
                   help="per-epoch weights, history.json, train_config.json (default: <out>.run when --out is local)")
    typed = {"classes": int, "per_class": int, "input_size": int, "batch_size": int, "epochs": int,
             "finetune_epochs": int, "lr": float, "finetune_lr": float, "finetune_layers": int, "feature_views": int,
             "dense_units": int, "dropout": float, "label_smoothing": float, "patience": int,
             "val_fraction": float, "seed": int, "max_steps_per_epoch": int}
    p.add_argument("--backbone", default=None,
                   help=f"backbone model, one of core.registry's names (preset: {_preset_default('backbone')})")
    p.add_argument("--weights", default=None,
                   help="'imagenet' (Keras download), a local .h5 file, or 'none' (preset: imagenet)")
    for opt, kind in typed.items():
        p.add_argument(f"--{opt.replace('_', '-')}", type=kind, default=None,
                       help=f"{_HELP[opt]} (preset {DEFAULT_PRESET}: {_shown(_preset_default(_OVERRIDES[opt]))})")
    p.add_argument("--config", default=None,
                   help="a config JSON/YAML file (e.g. tune's best_config.json) as the defaults, instead of --preset")
    from jobs.train_distributed import add_distributed_arguments

    add_distributed_arguments(p)
    from core.config import VIEW_KINDS

    p.add_argument("--view-kind", default=None, choices=VIEW_KINDS,
                   help=f"the cached --feature-views: random augmentations, or the photo and its mirror image "
                        f"(preset: {_preset_default('head_view_kind')})")
    p.add_argument("--finetune-cached", default=None, action=argparse.BooleanOptionalAction,
                   help=f"fine-tune the top layers on cached activations of the --feature-views augmented views "
                        f"(fast on CPU) instead of decoding + augmenting every epoch "
                        f"(preset: {_preset_default('finetune_cached')})")
    p.add_argument("--tta-flip", default=None, action=argparse.BooleanOptionalAction,
                   help=f"consider flip test-time averaging in the exported graph, kept only if it measures "
                        f"better (preset: {_preset_default('tta_flip')})")
    p.add_argument("--tta-sizes", default=None, type=int, nargs="*", metavar="PX",
                   help=f"other input sizes the exported graph also averages over, kept only if that measures "
                        f"better; the cached-feature head trains on views at each; no value = none "
                        f"(preset: {' '.join(map(str, _preset_default('tta_sizes'))) or 'none'})")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    if getattr(args, "config", None):
        from jobs.train_distributed import load_train_config

        cfg = load_train_config(args.config)
    else:
        cfg = get_preset(args.preset)
    changes = {field: getattr(args, opt) for opt, field in _OVERRIDES.items() if getattr(args, opt, None) is not None}
    if isinstance(changes.get("weights"), str) and changes["weights"].lower() == "none":
        changes["weights"] = None
    return cfg.replace(**changes)


def card_extra(result, data_fingerprint: str) -> dict:
    metrics = dict(result.metrics)
    metrics.update({k: v for k, v in result.extras.items() if k != "timings"})
    return {
        "backbone": result.config.backbone,
        "train_config": result.config.to_dict(),
        "data_fingerprint": data_fingerprint,
        "metrics": metrics,
        "history": result.history,
        "timings": result.extras.get("timings", {}),
    }


def run(args: argparse.Namespace) -> int:
    from core import console

    cfg = config_from_args(args)
    if args.workers is not None:  # over Ray Train workers: the same command on a laptop or a cluster
        from jobs.train_distributed import run_from_args

        return run_from_args(cfg, args)
    ckpt = args.checkpoint_dir
    if ckpt is None and "://" not in args.out:
        ckpt = str(Path(args.out).with_name(Path(args.out).name + ".run"))
    console.import_tensorflow(Path(ckpt) / "logs" if ckpt and "://" not in ckpt else None)
    from core import bundle, datasets
    from core import train as core_train

    folder = datasets.select_classes(datasets.discover(args.data), cfg.classes)
    t0 = time.time()
    with contextlib.redirect_stdout(sys.stderr):  # Keras' epoch lines are progress: stdout is the summary
        result = core_train.train(cfg, folder, checkpoint_dir=ckpt)
    result.extras.setdefault("timings", {})["total_s"] = round(time.time() - t0, 1)
    log.info("exporting the bundle to %s (SavedModel, then checks)", args.out)  # tens of seconds on 2 cores
    bundle.export_bundle(result.model, result.classes, args.out, input_size=core_train.input_size_of(cfg),
                         resize_policy=cfg.resize_policy, card_extra=card_extra(result, datasets.fingerprint(folder)))
    summary = {"out": args.out, "top1": round(result.metrics["top1"], 4), "top3": round(result.metrics["top3"], 4),
               **{k: v for k, v in result.extras.items() if k != "timings"}, "timings": result.extras["timings"]}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":  # `python -m jobs.train …`: what `breedlabel submit train` runs on the cluster
    from jobs.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
