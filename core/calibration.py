"""Probabilities that mean what they say: temperature scaling (Guo et al., 2017) and the ECE.

Training with label smoothing and averaging test-time views both leave the top-1 probability
off from the accuracy it should predict. One scalar T, fitted on the validation split by
minimising the negative log-likelihood, fixes most of it without changing any ranking:
p' = softmax(log p / T). It lives in the exported graph (`Temperature`), so the `prob` in the
Parquet output is the calibrated one on every runtime. Pure numpy here, except the layer.
"""
from __future__ import annotations

import logging
import math

import numpy as np

BINS = 10
_EPS = 1e-12
log = logging.getLogger(__name__)

_LOG_T_RANGE = (-4.0, 4.0)  # T in [0.018, 55]: far beyond any sensible value


def reliability(y_true: np.ndarray, probs: np.ndarray, bins: int = BINS):
    """Per-bin mean confidence, accuracy and count of the top-1 probability, the bin edges and
    the expected calibration error (count-weighted |accuracy - confidence|)."""
    probs = np.asarray(probs, np.float64)
    y_true = np.asarray(y_true)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    safe = np.maximum(counts, 1)
    mean_conf = np.bincount(index, weights=confidence, minlength=bins) / safe
    mean_acc = np.bincount(index, weights=correct, minlength=bins) / safe
    ece = float(np.sum(np.abs(mean_acc - mean_conf) * counts) / max(len(y_true), 1))
    return mean_conf, mean_acc, counts, edges, ece


def ece(y_true: np.ndarray, probs: np.ndarray, bins: int = BINS) -> float:
    return reliability(y_true, probs, bins)[-1]


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T), as the `Temperature` layer computes it."""
    logits = np.log(np.maximum(np.asarray(probs, np.float64), _EPS)) / float(temperature)
    logits -= logits.max(axis=1, keepdims=True)
    out = np.exp(logits)
    return (out / out.sum(axis=1, keepdims=True)).astype(np.float32)


def _nll(y_true: np.ndarray, probs: np.ndarray, temperature: float) -> float:
    scaled = apply_temperature(probs, temperature)
    return float(-np.mean(np.log(np.maximum(scaled[np.arange(len(y_true)), y_true], _EPS))))


def fit_temperature(y_true: np.ndarray, probs: np.ndarray, iterations: int = 60) -> float:
    """The T minimising the validation NLL (golden-section search on log T; the NLL is convex
    in 1/T). 1.0 when there is nothing to fit on."""
    y_true = np.asarray(y_true, np.int64)
    if len(y_true) == 0:
        return 1.0
    lo, hi = _LOG_T_RANGE
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = _nll(y_true, probs, math.exp(a)), _nll(y_true, probs, math.exp(b))
    for _ in range(iterations):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = _nll(y_true, probs, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = _nll(y_true, probs, math.exp(b))
    return float(math.exp((lo + hi) / 2))


def calibrate(y_true: np.ndarray, probs: np.ndarray, seed: int = 0) -> dict:
    """Fit T on all of `probs` and say what it does: the card's `calibration` entry. The ECE
    after is also given two-fold cross-fitted (T fitted on one half, measured on the other), the
    honest figure, since the same split both fits and measures otherwise."""
    y_true = np.asarray(y_true, np.int64)
    temperature = fit_temperature(y_true, probs)
    order = np.random.default_rng(seed).permutation(len(y_true))
    halves = (order[: len(order) // 2], order[len(order) // 2:])
    crossed = np.empty((len(y_true), np.asarray(probs).shape[1]), np.float32)
    for fit_on, measure_on in (halves, halves[::-1]):
        t_half = fit_temperature(y_true[fit_on], np.asarray(probs)[fit_on])
        crossed[measure_on] = apply_temperature(np.asarray(probs)[measure_on], t_half)
    before, crossfit = ece(y_true, probs), ece(y_true, crossed)
    at_bound = min(abs(math.log(temperature) - end) for end in _LOG_T_RANGE) < 1e-3
    if at_bound or crossfit > before:
        log.warning("calibration: %d validation photos are too few to fit a temperature (T=%.3g%s, cross-fitted "
                    "ECE %.3f against %.3f before); the bundle's probabilities are not calibrated; train on more "
                    "photos per class", len(y_true), temperature, ", at its bound" if at_bound else "", crossfit,
                    before)
    return {
        "method": "temperature",
        "temperature": round(temperature, 5),
        "fitted_on": "validation split",
        "ece_before": round(before, 5),
        "ece_after": round(ece(y_true, apply_temperature(probs, temperature)), 5),
        "ece_after_crossfit": round(crossfit, 5),
        "bins": BINS,
    }


def temperature_layer(temperature: float, name: str = "temperature"):
    """Keras layer: probabilities in, calibrated probabilities out (float32)."""
    import tensorflow as tf
    import tf_keras as keras

    class Temperature(keras.layers.Layer):
        def call(self, probs):
            logits = tf.math.log(tf.maximum(tf.cast(probs, tf.float32), _EPS)) / float(temperature)
            return tf.nn.softmax(logits, axis=-1)

    return Temperature(name=name, dtype="float32")
