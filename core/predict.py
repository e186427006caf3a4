"""Images in, top-k breeds out: the bundle's decode settings + a runtime + top-k.

The one predictor behind `breedlabel predict`, `evaluate` and the UI. It runs the label job's
read -> decode -> infer path (core.labelling), so an image gets the same answer and the same
error reason (core.reasons) everywhere. Per-image problems (not an image, truncated,
unreadable) are kept per image, never raised, so one bad file does not cost the others.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from core import console, labelling
from core.breeds import Breed
from core.bundle import Bundle, load_bundle
from core.errors import ConfigError, InputError, StorageError
from core.reasons import REASON_NOT_A_FILE, REASON_UNREADABLE
from core.runtime import Outputs, load_runtime

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictConfig:
    """Defaults for predict (shown by `breedlabel predict --help`)."""

    top_k: int = 3
    runtime: str = "auto"
    threads: int | None = None
    batch_size: int = 32


@dataclass(frozen=True)
class Prediction:
    breed_id: str
    breed: str  # Breed.name, as in labels.json
    prob: float


@dataclass(frozen=True)
class ImageResult:
    """One input's outcome: `predictions` when labelled, else `error` (a short reason)."""

    source: str
    predictions: list[Prediction] | None = None
    error: str | None = None
    width: int | None = None
    height: int | None = None
    probs: np.ndarray | None = field(default=None, repr=False, compare=False)  # only if asked for
    dog_score: float | None = None  # None for a bundle without a dog score
    is_dog: bool | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def top_k(probs: np.ndarray, classes: Sequence[Breed], k: int = 3) -> list[list[Prediction]]:
    """Per row, the k most probable classes, sorted by probability (desc; ties by class order)."""
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim != 2 or probs.shape[1] != len(classes):
        raise ConfigError(f"top_k: probabilities of shape {list(probs.shape)} do not match {len(classes)} classes")
    k = max(1, min(int(k), len(classes)))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [[Prediction(classes[j].id, classes[j].name, float(row[j])) for j in idx] for row, idx in zip(probs, order)]


class _WhyReader:
    """labelling.read_object that keeps why a read failed, by URI: labelling.fetch reduces it to a
    row's short reason ("cannot read"), where one image's error should say what to do ("not a
    regular file (a directory); give a file")."""

    def __init__(self) -> None:
        self.why: dict[str, str] = {}

    def __call__(self, uri: str, member: str | None) -> bytes:
        try:
            return labelling.read_object(uri, member)
        except (StorageError, InputError) as exc:
            self.why[uri] = str(exc).removeprefix(f"{uri}: ")
            raise


class Predictor:
    """Loads a bundle and a runtime once; decodes with the card's input_size + resize_policy."""

    def __init__(self, bundle_uri: str | Bundle, runtime: str = "auto", threads: int | None = None,
                 batch_size: int = PredictConfig.batch_size, **runtime_options):
        if batch_size < 1:
            raise ConfigError(f"--batch-size {batch_size}: give a whole number, at least 1")
        self.bundle = bundle_uri if isinstance(bundle_uri, Bundle) else load_bundle(str(bundle_uri))
        self.runtime = load_runtime(self.bundle, runtime, threads, **runtime_options)
        self.batch_size = int(batch_size)
        self.size = self.bundle.input_size
        self.policy = self.bundle.resize_policy

    @property
    def classes(self) -> list[Breed]:
        return self.bundle.classes

    @property
    def dog_threshold(self) -> float | None:
        return self.bundle.dog_threshold

    def infer_arrays(self, images: np.ndarray) -> Outputs:
        """uint8 [N,H,W,3] at the bundle's input size -> float32 probs [N,C] and, where the bundle
        has them, dog scores [N]; in batches."""
        parts = [self.runtime.infer(images[i:i + self.batch_size]) for i in range(0, len(images), self.batch_size)]
        if not parts:
            return Outputs(np.zeros((0, len(self.classes)), np.float32), None)
        dogs = [p.dog_score for p in parts]
        return Outputs(np.concatenate([p.probs for p in parts]),
                       None if any(d is None for d in dogs) else np.concatenate(dogs))

    def predict_bytes(self, datas: Sequence[bytes], k: int = PredictConfig.top_k,
                      sources: Sequence[str] | None = None, with_probs: bool = False) -> list[ImageResult]:
        """Decode + predict; a bad image gets an error result, the others their top-k."""
        sources = list(sources) if sources is not None else [f"image {i}" for i in range(len(datas))]
        return self._results(sources, list(datas), [None] * len(datas), k, with_probs)

    def predict_paths(self, paths: Sequence[str], k: int = PredictConfig.top_k,
                      with_probs: bool = False) -> list[ImageResult]:
        """Like predict_bytes for files or URIs; unreadable ones get an error result that says why."""
        results: list[ImageResult] = []
        for start in range(0, len(paths), self.batch_size):
            chunk = [str(p) for p in paths[start:start + self.batch_size]]
            read = _WhyReader()
            with console.quiet_logger(labelling.__name__):  # its "cannot read" warning: the why is in the result
                got = labelling.fetch(chunk, [None] * len(chunk), read=read)
            errors = [read.why.get(uri, e) if e in (REASON_UNREADABLE, REASON_NOT_A_FILE) else e
                      for uri, e in zip(chunk, got.errors)]
            results += self._results(chunk, got.datas, errors, k, with_probs)
        return results

    def _results(self, sources: list[str], datas: list, errors: list, k: int, with_probs: bool) -> list[ImageResult]:
        images, ok, widths, heights, reasons = labelling.decode_into(datas, sources, self.size, self.policy, None)
        outputs = self.infer_arrays(images[ok])
        dogs = outputs.dog_score if outputs.dog_score is not None else [None] * len(outputs.probs)
        ranked = iter(zip(top_k(outputs.probs, self.classes, k), outputs.probs, dogs))
        threshold = self.dog_threshold
        results = []
        for i, source in enumerate(sources):
            if not ok[i]:
                results.append(ImageResult(source, error=errors[i] or reasons[i]))
                continue
            preds, row, dog = next(ranked)
            results.append(ImageResult(source, preds, width=widths[i], height=heights[i],
                                       probs=row if with_probs else None,
                                       dog_score=None if dog is None else float(dog),
                                       is_dog=None if dog is None or threshold is None else bool(dog >= threshold)))
        return results
