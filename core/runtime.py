"""Execute a bundle's SavedModel: OpenVINO on CPU, TensorFlow on GPU (chosen at load time).

Why two: on CPU OpenVINO reads the SavedModel directly and runs it several times faster than
TensorFlow with the same top-1 (see DESIGN.md); on a GPU TensorFlow is the natural choice.
Never loads through Keras, so the bundle has no Keras version coupling. Every runtime takes
uint8 [N,H,W,3] and returns float32 probabilities [N,C] (`predict`), or those and the bundle's
dog score [N] where its graph has one, else None (`infer`).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np

from core import console
from core.bundle import DOG_SCORE_OUTPUT, INPUT_NAME, OUTPUT_NAME, SIGNATURE, Bundle, cache_root, check_output_width
from core.errors import BundleError, ConfigError, InputError

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "openvino", "tensorflow")
OV_MODES = ("sync", "async")
OV_HINTS = ("THROUGHPUT", "LATENCY")
OV_PRECISIONS = ("f32", "bf16")
# f32, not OpenVINO's own default (bf16 where the CPU has AMX/AVX512-BF16): measured on an
# AVX512-BF16 EPYC, a MobileNetV2 bundle on the 120 sample_bucket photos agreed with TensorFlow
# on 96.7 % of top-1s (max |Δprob| 0.11) in bf16 and on 100 % (max |Δprob| 5e-6) in f32; the
# contract (DESIGN.md) is ≥ 99.5 % and 0.02. precision="bf16" remains an explicit choice.
DEFAULT_OV_PRECISION = "f32"
OV_CACHE_ENV = "BREEDLABEL_OV_CACHE"  # "0" disables the converted-model cache


class Outputs(NamedTuple):
    probs: np.ndarray  # float32 [N, C]
    dog_score: np.ndarray | None  # float32 [N]; None for a bundle without one


class Runtime(Protocol):
    name: str
    input_size: tuple[int, int]
    num_classes: int

    def infer(self, images: np.ndarray) -> Outputs: ...

    def predict(self, images: np.ndarray) -> np.ndarray: ...


def _empty(num_classes: int, with_dog_score: bool) -> Outputs:
    return Outputs(np.zeros((0, num_classes), np.float32), np.zeros(0, np.float32) if with_dog_score else None)


def describe_runtime(runtime: Runtime) -> str:
    """What really runs, for run manifests and logs: "openvino/f32", "tensorflow"."""
    precision = getattr(runtime, "precision", None)
    return f"{runtime.name}/{precision}" if precision else runtime.name


def _check_batch(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    arr = np.asarray(images)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[1:] != (*size, 3):
        raise InputError(f"runtime input must be uint8 [N,{size[0]},{size[1]},3], got {arr.dtype} "
                         f"{list(arr.shape)}; decode with core.images at the bundle's input_size")
    return np.ascontiguousarray(arr)


# ---------------------------------------------------------------- OpenVINO


def _convert_openvino(bundle: Bundle):
    """SavedModel -> ov.Model, cached as IR next to the bundle cache keyed by model_id (~1 s saved)."""
    import openvino as ov

    use_cache = os.environ.get(OV_CACHE_ENV, "1") != "0"
    xml = cache_root() / "openvino" / bundle.model_id / "model.xml"
    if use_cache and xml.is_file():
        try:
            return ov.Core().read_model(str(xml))
        except Exception:  # a damaged cache entry: convert again
            log.debug("ignoring unreadable OpenVINO cache %s", xml)
    model = ov.convert_model(bundle.model_path)
    if use_cache:
        try:
            xml.parent.mkdir(parents=True, exist_ok=True)
            tmp = xml.with_name(f".tmp-{os.getpid()}.xml")
            ov.save_model(model, str(tmp), compress_to_fp16=False)  # fp16 weights would cost parity
            os.replace(tmp.with_suffix(".bin"), xml.with_suffix(".bin"))
            os.replace(tmp, xml)
        except OSError as exc:
            log.debug("could not cache converted model at %s: %s", xml, exc)
    return model


class OpenVINORuntime:
    """Compiled for the host CPU. mode="sync": one infer of the whole batch (LATENCY hint);
    mode="async": the batch split over an AsyncInferQueue (THROUGHPUT hint)."""

    name = "openvino"

    def __init__(self, bundle: Bundle, threads: int | None = None, *, mode: str = "sync",
                 hint: str | None = None, precision: str | None = None):
        import openvino as ov
        import openvino.properties as props
        import openvino.properties.hint as hints

        if mode not in OV_MODES:
            raise ConfigError(f"openvino mode {mode!r} is not one of {list(OV_MODES)}")
        hint = hint or ("LATENCY" if mode == "sync" else "THROUGHPUT")
        if hint not in OV_HINTS:
            raise ConfigError(f"openvino hint {hint!r} is not one of {list(OV_HINTS)}")
        precision = precision or DEFAULT_OV_PRECISION
        if precision not in OV_PRECISIONS:
            raise ConfigError(f"openvino precision {precision!r} is not one of {list(OV_PRECISIONS)}")
        self.input_size = bundle.input_size
        self.mode = mode
        model = _convert_openvino(bundle)
        config: dict = {hints.performance_mode: getattr(hints.PerformanceMode, hint)}
        if threads:
            config[props.inference_num_threads] = int(threads)
        config[hints.inference_precision] = getattr(ov.Type, precision)
        self._compiled = ov.Core().compile_model(model, "CPU", config)
        self._probs_out, self._dog_out = _ov_outputs(self._compiled)
        out_shape = self._compiled.output(self._probs_out).get_partial_shape()
        width = out_shape[-1].get_length() if out_shape[-1].is_static else None
        check_output_width(bundle, width)
        self.num_classes = bundle.num_classes
        self.precision = self._compiled.get_property(hints.inference_precision).get_type_name()
        self._nreq = int(self._compiled.get_property(props.optimal_number_of_infer_requests))
        self._request = self._compiled.create_infer_request()
        self._queue = ov.AsyncInferQueue(self._compiled, self._nreq) if mode == "async" else None
        log.debug("openvino: mode=%s hint=%s precision=%s requests=%d", mode, hint, self.precision, self._nreq)

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.infer(images).probs

    def infer(self, images: np.ndarray) -> Outputs:
        arr = _check_batch(images, self.input_size)
        if len(arr) == 0:
            return _empty(self.num_classes, self._dog_out is not None)
        if self._queue is None or len(arr) == 1:
            result = self._request.infer({0: arr}, share_inputs=True)
            dog = None if self._dog_out is None else np.array(result[self._dog_out], np.float32, copy=True)
            return Outputs(np.array(result[self._probs_out], dtype=np.float32, copy=True), dog)
        return self._infer_async(arr)

    def _infer_async(self, arr: np.ndarray) -> Outputs:
        out = np.empty((len(arr), self.num_classes), np.float32)
        dog = np.empty(len(arr), np.float32) if self._dog_out is not None else None
        chunks = np.array_split(np.arange(len(arr)), min(self._nreq, len(arr)))

        def done(request, start: int) -> None:
            res = request.get_output_tensor(self._probs_out).data
            out[start:start + len(res)] = res
            if dog is not None:
                dog[start:start + len(res)] = request.get_output_tensor(self._dog_out).data

        self._queue.set_callback(done)
        for idx in chunks:
            self._queue.start_async({0: arr[idx[0]:idx[-1] + 1]}, int(idx[0]))
        self._queue.wait_all()
        return Outputs(out, dog)


def _ov_outputs(compiled) -> tuple[int, int | None]:
    """(index of the probabilities, index of the dog score or None): by the signature's output
    names where the conversion kept them, else by rank (probabilities [N,C], score [N])."""
    outputs = list(compiled.outputs)
    if len(outputs) == 1:
        return 0, None
    named = {name.split(":")[0]: i for i, out in enumerate(outputs) for name in out.get_names()}
    if OUTPUT_NAME in named and DOG_SCORE_OUTPUT in named:
        return named[OUTPUT_NAME], named[DOG_SCORE_OUTPUT]
    ranks = [out.get_partial_shape().rank.get_length() for out in outputs]
    return ranks.index(2), ranks.index(1)


# ---------------------------------------------------------------- TensorFlow


class TensorFlowRuntime:
    """tf.saved_model.load + the serving signature; GPU memory growth on."""

    name = "tensorflow"
    fallback: str | None = None  # why `auto` chose TensorFlow on a CPU (OpenVINO failed)

    def __init__(self, bundle: Bundle, threads: int | None = None):
        tf = console.import_tensorflow()  # its C++ start-up lines go to a log file unless verbose
        for gpu in tf.config.list_physical_devices("GPU"):
            try:
                tf.config.experimental.set_memory_growth(gpu, True)
            except RuntimeError:  # already initialised by an earlier load: keep what is set
                pass
        if threads:
            try:
                tf.config.threading.set_intra_op_parallelism_threads(int(threads))
                tf.config.threading.set_inter_op_parallelism_threads(1)
            except RuntimeError:
                log.debug("tensorflow already initialised; threads=%s not applied", threads)
        self.input_size = bundle.input_size
        self._loaded = tf.saved_model.load(bundle.model_path)
        if SIGNATURE not in self._loaded.signatures:
            raise BundleError(f"bundle {bundle.path}: the SavedModel has no {SIGNATURE!r} signature; "
                              "re-export the bundle with breedlabel")
        self._fn = self._loaded.signatures[SIGNATURE]
        out = self._fn.structured_outputs.get(OUTPUT_NAME)
        if out is None:
            raise BundleError(f"bundle {bundle.path}: signature {SIGNATURE!r} has no {OUTPUT_NAME!r} output")
        check_output_width(bundle, out.shape[-1])
        self.num_classes = bundle.num_classes
        self._has_dog = DOG_SCORE_OUTPUT in self._fn.structured_outputs
        self._tf = tf

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.infer(images).probs

    def infer(self, images: np.ndarray) -> Outputs:
        arr = _check_batch(images, self.input_size)
        if len(arr) == 0:
            return _empty(self.num_classes, self._has_dog)
        out = self._fn(**{INPUT_NAME: self._tf.constant(arr)})
        dog = out[DOG_SCORE_OUTPUT].numpy().astype(np.float32, copy=False) if self._has_dog else None
        return Outputs(out[OUTPUT_NAME].numpy().astype(np.float32, copy=False), dog)


# ---------------------------------------------------------------- choice


def gpu_visible() -> bool:
    """Cheap check (no TF import): an NVIDIA device node and CUDA_VISIBLE_DEVICES not hiding it."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return Path("/dev/nvidia0").exists() or any(Path("/proc/driver/nvidia/gpus").glob("*"))


def _tf_sees_gpu() -> bool:
    return bool(console.import_tensorflow().config.list_physical_devices("GPU"))


def load_runtime(bundle: Bundle, runtime: str = "auto", threads: int | None = None, **ov_options) -> Runtime:
    """auto = OpenVINO on CPU, TensorFlow when a GPU is visible or OpenVINO cannot run the graph.

    ov_options (mode, hint, precision) go to OpenVINORuntime.
    """
    if runtime not in RUNTIMES:
        raise ConfigError(f"runtime {runtime!r} is not one of {list(RUNTIMES)}")
    if threads is not None and threads < 0:  # OpenVINO refuses it and TensorFlow aborts the process
        raise ConfigError(f"--threads {threads}: give a whole number, at least 1 (or leave it out for all cores)")
    if runtime == "tensorflow" or (runtime == "auto" and gpu_visible() and _tf_sees_gpu()):
        return TensorFlowRuntime(bundle, threads)
    try:
        return OpenVINORuntime(bundle, threads, **ov_options)
    except (BundleError, ConfigError):
        raise
    except ImportError as exc:
        if runtime == "openvino":
            raise ConfigError(f"--runtime openvino: openvino is not installed ({exc}); "
                              "install it or use --runtime tensorflow") from exc
        reason = f"openvino is not available ({exc})"
    except Exception as exc:  # conversion/compilation failures of an unusual graph
        if runtime == "openvino":
            raise BundleError(f"bundle {bundle.path}: OpenVINO cannot convert/compile the model "
                              f"({type(exc).__name__}: {exc}); use --runtime tensorflow") from exc
        reason = f"OpenVINO cannot run this model ({type(exc).__name__}: {str(exc)[:200]})"
    log.warning("runtime auto: %s; falling back to TensorFlow", reason)
    fallback = TensorFlowRuntime(bundle, threads)
    fallback.fallback = reason  # the label job's driver says it once, and the manifest records it
    return fallback
