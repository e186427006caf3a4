"""The evaluation report: an HTML page with PNG plots, written next to evaluate's metrics JSON.

It takes plain arrays (true labels, probabilities [N, C], class list, image URIs, an optional
training history) so anything that has predictions can draw it; `core.evaluate` / the
`evaluate` job call `write_report`. Figures are in `core.plots`.
"""
from __future__ import annotations

import html
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from core import plots
from core.calibration import BINS as CALIBRATION_BINS
from core.calibration import reliability as calibration
from core.errors import BreedlabelError, InputError
from core.evaluate import confusion_counts, per_class_accuracy, top_k_accuracy

log = logging.getLogger(__name__)

REPORT_FILE = "report.html"
PLOTS_DIR = "plots"
PER_CLASS_PNG = "per_class_accuracy.png"
CONFUSION_PNG = "confusion_worst.png"
TOPK_PNG = "topk_accuracy.png"
RELIABILITY_PNG = "reliability.png"
PAIRS_PNG = "confused_pairs.png"
HISTORY_PNG = "training_curves.png"

MAX_K = 10
WORST_CLASSES = 12
TOP_PAIRS = 6
THUMBS_PER_PAIR = 4
THUMB_SIZE = (96, 96)


@dataclass(frozen=True)
class Summary:
    """The figures the report states in words; also handy for a caller's metrics JSON."""

    n: int
    top1: float
    top3: float
    ece: float
    topk: list[float]
    confused_pairs: list[dict[str, Any]]


def class_names(classes: Sequence[Any]) -> list[str]:
    """Readable names for Breed objects (their `display`) or plain strings."""
    return [getattr(c, "display", None) or str(c) for c in classes]


def topk_accuracy(y_true: np.ndarray, probs: np.ndarray, max_k: int = MAX_K) -> np.ndarray:
    """accuracy[k-1] = share of images whose true class is among the k most probable."""
    return np.array([top_k_accuracy(probs, y_true, k) for k in range(1, min(max_k, probs.shape[1]) + 1)])


def confused_pairs(matrix: np.ndarray, top: int = TOP_PAIRS) -> list[tuple[int, int, int, int]]:
    """Unordered class pairs with the most mistakes either way: (a, b, a→b, b→a), worst first."""
    off = matrix - np.diag(np.diag(matrix))
    both = np.triu(off + off.T, k=1)
    flat = np.argsort(both, axis=None, kind="stable")[::-1][:top]
    pairs = []
    for a, b in zip(*np.unravel_index(flat, both.shape)):
        if both[a, b] == 0:
            break
        if off[b, a] > off[a, b]:
            a, b = b, a
        pairs.append((int(a), int(b), int(off[a, b]), int(off[b, a])))
    return pairs


def worst_classes(matrix: np.ndarray, count: int = WORST_CLASSES) -> list[int]:
    """The least accurate classes plus what they are most often taken for, capped at `count`."""
    support = matrix.sum(axis=1)
    accuracy = np.divide(np.diag(matrix), support, out=np.ones(len(matrix)), where=support > 0)
    chosen: list[int] = []
    for c in np.argsort(accuracy, kind="stable"):
        if len(chosen) >= count or accuracy[c] >= 1.0:
            break
        errors = matrix[c].copy()
        errors[c] = 0
        for k in (int(c), int(errors.argmax())):
            if k not in chosen and len(chosen) < count:
                chosen.append(k)
    return sorted(chosen) or list(range(min(count, len(matrix))))


def load_history(history: str | os.PathLike | Mapping | Sequence | None):
    """Training history as {metric: per-epoch values} plus phase boundaries (epoch indices).

    Accepts a JSON path/URI or an object: Keras' `{metric: [..]}`, a list of per-epoch dicts,
    or `{phase: <either form>}` for a multi-phase run (probe, then fine-tune).
    """
    if history is None:
        return {}, []
    if isinstance(history, (str, os.PathLike)):
        history = json.loads(_read_bytes(str(history)))
    if isinstance(history, Mapping) and "history" in history:
        history = history["history"]
    series = _series(history)
    if series or not isinstance(history, Mapping):
        return series, []
    merged: dict[str, list[float]] = {}
    boundaries: list[int] = []
    done = 0
    for part in history.values():
        part_series = _series(part)
        length = max((len(v) for v in part_series.values()), default=0)
        if not length:
            continue
        if done:
            boundaries.append(done)
        for key in set(merged) | set(part_series):
            values = part_series.get(key, [])
            merged.setdefault(key, [float("nan")] * done).extend(values + [float("nan")] * (length - len(values)))
        done += length
    return merged, boundaries


def _series(obj: Any) -> dict[str, list[float]]:
    numeric = (int, float)
    if isinstance(obj, Mapping) and obj and all(
            isinstance(v, list) and all(isinstance(x, numeric) or x is None for x in v) for v in obj.values()):
        return {k: [np.nan if x is None else float(x) for x in v] for k, v in obj.items()}
    if isinstance(obj, list) and obj and all(isinstance(r, Mapping) for r in obj):
        keys = [k for k in obj[0] if isinstance(obj[0][k], numeric) and k != "epoch"]
        return {k: [float(r.get(k, np.nan)) for r in obj] for k in keys}
    return {}


def _read_bytes(uri: str) -> bytes:
    from core import storage

    return storage.read_bytes(uri)


def _thumbnail(uri: str) -> np.ndarray | None:
    from core.images import decode_image

    try:
        return decode_image(_read_bytes(uri), size=THUMB_SIZE, policy="resize_crop", source=uri).array
    except BreedlabelError as exc:
        log.warning("report: no thumbnail for %s (%s)", uri, exc)
        return None


def _pair_thumbs(pair, y_true, y_pred, probs, paths) -> list[tuple[np.ndarray | None, str]]:
    a, b = pair[0], pair[1]
    wrong = np.flatnonzero(((y_true == a) & (y_pred == b)) | ((y_true == b) & (y_pred == a)))
    wrong = wrong[np.argsort(-probs[wrong, y_pred[wrong]], kind="stable")][:THUMBS_PER_PAIR]
    arrow = {a: "A→B", b: "B→A"}
    return [(_thumbnail(paths[i]), f"{arrow[int(y_true[i])]} {probs[i, y_pred[i]]:.0%}") for i in wrong]


def _check_inputs(y_true, probs, classes, image_paths) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != len(classes):
        raise InputError(f"report: probabilities have shape {probs.shape}, expected [N, {len(classes)}] "
                         "(one column per class, in the bundle's labels.json order)")
    if y_true.shape != (probs.shape[0],) or not len(y_true):
        raise InputError(f"report: {y_true.shape[0] if y_true.ndim else 0} labels for "
                         f"{probs.shape[0]} predictions; pass one true label per image (N > 0)")
    if y_true.min() < 0 or y_true.max() >= len(classes):
        raise InputError(f"report: labels must be class indices in [0, {len(classes)})")
    if image_paths is not None and len(image_paths) != len(y_true):
        raise InputError(f"report: {len(image_paths)} image paths for {len(y_true)} labels")
    return y_true, probs


@dataclass(frozen=True)
class Report:
    uri: str                # the HTML file
    plots: list[str]        # PNG paths relative to the HTML file
    summary: Summary


def write_report(out_dir: str | os.PathLike, y_true: Sequence[int] | np.ndarray, probs: np.ndarray,
                 classes: Sequence[Any], *, image_paths: Sequence[str] | None = None,
                 history: str | os.PathLike | Mapping | Sequence | None = None,
                 title: str = "breedlabel evaluation report", details: Mapping[str, Any] | None = None,
                 extra_sections: Sequence[tuple[str, str, str, bytes]] = ()) -> Report:
    """Draw every plot and write `report.html` + `plots/*.png` under `out_dir` (path or URI).

    `image_paths` (one URI per row) give the confused pairs their thumbnails; `history` (a
    training run's history JSON or the object) adds the training curves; `extra_sections`
    (file name, heading, caption, PNG bytes) are appended, e.g. evaluate's dog-score histogram.
    """
    y_true, probs = _check_inputs(y_true, probs, classes, image_paths)
    names = class_names(classes)
    y_pred = probs.argmax(axis=1)
    matrix = confusion_counts(y_pred, y_true, len(names))
    summary, sections = _draw(y_true, y_pred, probs, matrix, names, image_paths, history)
    sections += list(extra_sections)
    out = str(out_dir).rstrip("/")
    for name, _, _, png in sections:
        _write(f"{out}/{PLOTS_DIR}/{name}", png)
    page = _html(title, summary, details or {}, [(n, h, c) for n, h, c, _ in sections], names)
    uri = f"{out}/{REPORT_FILE}"
    _write(uri, page.encode("utf-8"))
    log.info("report: wrote %s with %d plots", uri, len(sections))
    return Report(uri, [f"{PLOTS_DIR}/{s[0]}" for s in sections], summary)


def _draw(y_true, y_pred, probs, matrix, names, image_paths, history):
    support = matrix.sum(axis=1)
    accuracy = np.nan_to_num(per_class_accuracy(matrix))
    topk = topk_accuracy(y_true, probs)
    conf, acc, counts, edges, ece = calibration(y_true, probs)
    pairs = confused_pairs(matrix)
    worst = worst_classes(matrix)
    summary = Summary(
        n=len(y_true), top1=float(topk[0]), top3=float(topk[min(2, len(topk) - 1)]), ece=ece,
        topk=[float(x) for x in topk],
        confused_pairs=[{"a": names[a], "b": names[b], "a_as_b": ab, "b_as_a": ba} for a, b, ab, ba in pairs])
    sections = [
        (PER_CLASS_PNG, "Per-breed accuracy", "Sorted, worst breed first.",
         plots.per_class_accuracy_png(accuracy, support, names)),
        (TOPK_PNG, "Top-k accuracy", f"k = 1..{len(topk)}.", plots.topk_png(topk)),
        (RELIABILITY_PNG, "Calibration", f"Expected calibration error {ece:.3f} over {CALIBRATION_BINS} bins.",
         plots.reliability_png(conf, acc, counts, edges, ece)),
        (CONFUSION_PNG, "Confusion matrix of the worst classes",
         "The least accurate breeds and the breeds they are mistaken for.",
         plots.confusion_png(matrix[np.ix_(worst, worst)], [names[i] for i in worst])),
    ]
    if pairs and image_paths is not None:
        thumbs = [_pair_thumbs(p, y_true, y_pred, probs, image_paths) for p in pairs]
        rows = [(names[a], names[b], ab, ba) for a, b, ab, ba in pairs]
        sections.append((PAIRS_PNG, "Most-confused breed pairs",
                         "A→B: a photo of the first breed taken for the second, with its probability.",
                         plots.confused_pairs_png(rows, thumbs)))
    series, boundaries = load_history(history)
    if series:
        sections.append((HISTORY_PNG, "Training curves",
                         "Dotted lines separate training phases." if boundaries else "",
                         plots.history_png(series, boundaries)))
    return summary, sections


def _write(uri: str, data: bytes) -> None:
    if "://" in uri and not uri.startswith("file://"):
        from core import storage

        storage.write_bytes(uri, data)
        return
    path = Path(uri.removeprefix("file://"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
img{max-width:100%;border:1px solid #eee}figure{margin:1.5em 0}figcaption{color:#555}"""


def _html(title: str, summary: Summary, details: Mapping[str, Any],
          sections: list[tuple[str, str, str]], names: list[str]) -> str:
    esc = html.escape
    facts = {"images": summary.n, "classes": len(names), "top-1 accuracy": f"{summary.top1:.2%}",
             "top-3 accuracy": f"{summary.top3:.2%}", "ECE": f"{summary.ece:.3f}", **details}
    rows = "".join(f"<tr><th>{esc(str(k))}</th><td>{esc(str(v))}</td></tr>" for k, v in facts.items())
    pairs = "".join(
        f"<tr><td>{esc(p['a'])}</td><td>{esc(p['b'])}</td><td>{p['a_as_b']}</td><td>{p['b_as_a']}</td></tr>"
        for p in summary.confused_pairs)
    pair_table = (f"<h2>Most-confused pairs</h2><table><tr><th>A</th><th>B</th><th>A taken for B</th>"
                  f"<th>B taken for A</th></tr>{pairs}</table>") if pairs else ""
    figures = "".join(
        f'<figure><h2>{esc(heading)}</h2><img src="{PLOTS_DIR}/{esc(name)}" alt="{esc(heading)}">'
        f"<figcaption>{esc(caption)}</figcaption></figure>" for name, heading, caption in sections)
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{esc(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{esc(title)}</h1><table>{rows}</table>"
            f"{pair_table}{figures}</body></html>\n")
