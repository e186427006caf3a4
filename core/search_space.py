"""Hyperparameter search spaces: what `breedlabel tune` samples, in one readable table each.

Pure ML config, no Ray: keys are TrainConfig field names ("augment.<field>" for the
augmentation strengths) and values are small `Dim` records; jobs/tune.py turns them into
Ray Tune domains. A sampled point becomes a TrainConfig with `apply(base, params)`.
Spaces are plain functions registered in SPACES, like the TrainConfig presets.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from core.config import TrainConfig
from core.errors import ConfigError

CHOICE = "choice"
UNIFORM = "uniform"
LOGUNIFORM = "loguniform"
KINDS = (CHOICE, UNIFORM, LOGUNIFORM)
AUGMENT_PREFIX = "augment."

Space = dict[str, "Dim"]


@dataclass(frozen=True)
class Dim:
    """One search dimension: a categorical choice or a (log-)uniform float range."""

    kind: str
    values: tuple = ()
    low: float = 0.0
    high: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"search dimension kind {self.kind!r} is not one of {KINDS}")
        if self.kind == CHOICE and not self.values:
            raise ConfigError("a choice dimension needs at least one value")
        if self.kind != CHOICE and not self.low < self.high:
            raise ConfigError(f"a {self.kind} dimension needs low < high, got {self.low}, {self.high}")
        if self.kind == LOGUNIFORM and self.low <= 0:
            raise ConfigError("a loguniform dimension needs low > 0")


def choice(*values: Any) -> Dim:
    return Dim(CHOICE, values=tuple(values))


def uniform(low: float, high: float) -> Dim:
    return Dim(UNIFORM, low=float(low), high=float(high))


def loguniform(low: float, high: float) -> Dim:
    return Dim(LOGUNIFORM, low=float(low), high=float(high))


def default() -> Space:
    """A GPU cluster's search: backbones, both phases' rates, head, depth, batch, augmentation,
    grayscale/equalisation and input size. Needs ImageNet weights for every backbone."""
    return {
        "backbone": choice("mobilenet_v2", "efficientnet_b0", "efficientnet_v2_b0", "resnet50"),
        "input_size": choice(160, 192, 224),
        "head_lr": loguniform(1e-4, 3e-3),
        "finetune_lr": loguniform(1e-5, 3e-4),
        "dense_units": choice(0, 256, 512),
        "dropout": uniform(0.1, 0.5),
        "finetune_layers": choice(20, 40, 80),
        "batch_size": choice(32, 64),
        "augment.crop_scale_min": uniform(0.2, 0.8),
        "augment.zoom_out_prob": uniform(0.0, 0.3),
        "augment.contrast": uniform(0.0, 0.3),
        "augment.brightness": uniform(0.0, 0.3),
        "augment.saturation": uniform(0.0, 0.3),
        "grayscale": choice(False, True),
        "equalize": choice(False, True),
    }


def cpu() -> Space:
    """The same dimensions sized for a 2-core CPU box: MobileNetV2 only (one local weights
    file), small inputs, a short optional fine-tune of the top blocks."""
    return {
        "input_size": choice(96, 128, 160),
        "head_lr": loguniform(3e-4, 1e-2),
        "finetune_lr": loguniform(1e-5, 2e-4),
        "dense_units": choice(0, 256),
        "dropout": uniform(0.1, 0.5),
        "finetune_layers": choice(0, 10, 20),
        "batch_size": choice(16, 32),
        "augment.crop_scale_min": uniform(0.25, 0.9),
        "augment.contrast": uniform(0.0, 0.3),
        "augment.brightness": uniform(0.0, 0.3),
        "grayscale": choice(False, True),
        "equalize": choice(False, True),
    }


def smoke() -> Space:
    """Tests and demos: the custom CNN at 32 px, a few seconds a trial."""
    return {
        "head_lr": loguniform(1e-3, 3e-2),
        "dropout": uniform(0.0, 0.3),
        "dense_units": choice(0, 32),
        "batch_size": choice(8, 16),
    }


SPACES: dict[str, Callable[[], Space]] = {"default": default, "cpu": cpu, "smoke": smoke}


def get_space(name: str) -> Space:
    try:
        return SPACES[name]()
    except KeyError:
        raise ConfigError(f"unknown search space {name!r}; valid: {', '.join(SPACES)}") from None


def check_space(space: Mapping[str, Dim], base: TrainConfig) -> None:
    """Every key must name a TrainConfig (or AugmentConfig) field, and a local weights file (one
    backbone's) cannot serve a space that samples backbones: both fail before any trial runs."""
    if "backbone" in space and base.weights not in (None, "", "none", "imagenet"):
        raise ConfigError(f"--weights {base.weights} holds one backbone's weights ({base.backbone}), but this search "
                          f"space samples backbones ({', '.join(map(str, space['backbone'].values))}); use "
                          "--space cpu (the base backbone only) or --weights imagenet")
    fields, aug_fields = set(base.to_dict()), set(base.augment.__dataclass_fields__)
    for key in space:
        name = key[len(AUGMENT_PREFIX):] if key.startswith(AUGMENT_PREFIX) else key
        known = aug_fields if key.startswith(AUGMENT_PREFIX) else fields - {"augment"}
        if name not in known:
            raise ConfigError(f"search space key {key!r} is not a TrainConfig field; valid: {', '.join(sorted(known))}")


def apply(base: TrainConfig, params: Mapping[str, Any]) -> TrainConfig:
    """The TrainConfig a trial trains: `base` with the sampled `params` set."""
    def typed(current: Any, value: Any) -> Any:  # searchers may hand back 1/0 for True/False
        return bool(value) if isinstance(current, bool) else value

    flat = {k: typed(getattr(base, k, None), v) for k, v in params.items() if not k.startswith(AUGMENT_PREFIX)}
    aug = {k[len(AUGMENT_PREFIX):]: typed(getattr(base.augment, k[len(AUGMENT_PREFIX):], None), v)
           for k, v in params.items() if k.startswith(AUGMENT_PREFIX)}
    return base.replace(**flat, **({"augment": aug} if aug else {}))


def base_point(space: Mapping[str, Dim], base: TrainConfig) -> dict | None:
    """The base config's own values for the space's keys, to evaluate first (a known-good
    starting point for the searcher); None if a base value lies outside its dimension."""
    point: dict = {}
    for key, dim in space.items():
        value = (getattr(base.augment, key[len(AUGMENT_PREFIX):]) if key.startswith(AUGMENT_PREFIX)
                 else getattr(base, key))
        inside = value in dim.values if dim.kind == CHOICE else (
            value is not None and dim.low <= float(value) <= dim.high)
        if not inside:
            return None
        point[key] = value
    return point
