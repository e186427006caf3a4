"""What the `breedlabel ui` page computes, as plain functions and classes (no Gradio here).

The Gradio wiring in `jobs.ui` only passes component values in and shows what comes back,
so everything a person sees is testable without a browser.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core import explore, schema
from core.errors import BreedlabelError, ConfigError

log = logging.getLogger(__name__)

TOP_K = 3
ACCEPTED = "JPEG, PNG, GIF, WebP or BMP"
PLACEHOLDER_SIZE = explore.THUMB_SIZE


@dataclass(frozen=True)
class Verdict:
    """The classify tab's outputs: {breed: prob} for the bar chart, a message, a preview path."""

    label: dict[str, float] | None
    message: str
    preview: str | None
    ok: bool


class ClassifyPage:
    """One loaded predictor (bundle + runtime, loaded once per server) and the unsure threshold."""

    def __init__(self, predictor, min_prob: float):
        self.predictor = predictor
        self.min_prob = float(min_prob)

    def card_markdown(self) -> str:
        """The model's id and the card facts a person checks before trusting an answer."""
        bundle = self.predictor.bundle
        card = bundle.card or {}
        metrics = card.get("metrics") or {}
        facts = [
            ("model id", f"`{bundle.model_id[:16]}`"),
            ("backbone", card.get("backbone")),
            ("classes", len(bundle.classes)),
            ("input", f"{bundle.input_size[0]}×{bundle.input_size[1]} px, {bundle.resize_policy}"),
            ("runtime", getattr(self.predictor.runtime, "name", None)),
            ("top-1 / top-3 (validation)", _pair_pct(metrics.get("top1"), metrics.get("top3"))),
            ("created", card.get("created_at")),
        ]
        return "  \n".join(f"**{name}**: {value}" for name, value in facts if value not in (None, ""))

    def classify_file(self, path: str | None) -> Verdict:
        """Classify an uploaded file (any file: non-images get a clear message)."""
        if not path:
            return Verdict(None, f"Drop a photo ({ACCEPTED}) or pick an example.", None, False)
        name = Path(path).name
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            return Verdict(None, f"**{name}** could not be read ({exc.strerror or exc}). Upload it again.", None, False)
        return self.classify_bytes(data, name, preview=path)

    def classify_bytes(self, data: bytes, name: str, preview: str | None = None) -> Verdict:
        result = self.predictor.predict_bytes([data], k=TOP_K, sources=[name])[0]
        if not result.ok:
            return Verdict(None, f"**Not a photo:** {name}: {result.error}. "
                                 f"Upload a {ACCEPTED} image of a dog.", None, False)
        label = {_display(p.breed): round(p.prob, 4) for p in result.predictions}
        best = result.predictions[0]
        if result.is_dog is False:
            message = (f"**No dog found** (dog score {result.dog_score:.2f}, below "
                       f"{self.predictor.dog_threshold:.2f}). Were it a dog, the closest breeds are below.")
        elif best.prob < self.min_prob:
            message = (f"**Not sure:** the best guess, {_display(best.breed)}, has only "
                       f"{best.prob:.0%} (below {self.min_prob:.0%}). The photo may show no dog, "
                       "several dogs, or a breed this model does not know.")
        else:
            message = f"**{_display(best.breed)}** ({best.prob:.0%})"
        return Verdict(label, message, preview, True)


def _display(name: str) -> str:
    return name.replace("_", " ")


def _pair_pct(a: Any, b: Any) -> str | None:
    return None if a is None or b is None else f"{float(a):.1%} / {float(b):.1%}"


def find_examples(folder: str | None, limit: int) -> list[str]:
    """Example photos for the page: image files under a local folder, sorted, at most `limit`."""
    if not folder:
        return []
    from core import storage
    from core.formats import IMAGE_EXTENSIONS

    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"--examples {folder}: not a folder; give a local folder of photos or leave it out")
    found = sorted(info.uri for info in storage.list_files(str(root), extensions=IMAGE_EXTENSIONS))
    return found[:limit]


def placeholder(text: str, size: tuple[int, int] = PLACEHOLDER_SIZE) -> np.ndarray:
    """A grey tile with a short text, standing in for an image that cannot be shown."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (size[1], size[0]), (225, 225, 225))
    ImageDraw.Draw(im).multiline_text((6, size[0] // 2 - 12), text[:40].replace(" ", "\n", 1), fill=(90, 90, 90))
    return np.asarray(im)


@dataclass(frozen=True)
class ExplorerView:
    """Everything the run explorer shows for one output URI and filter."""

    status: str
    manifests: list[list[Any]]
    run_ids: list[str]
    breeds: list[str]
    histogram: list[tuple[str, int]]
    unsure_gallery: list[tuple[np.ndarray, str]]
    unsure_rows: list[list[Any]]
    error_gallery: list[tuple[np.ndarray, str]]
    error_rows: list[list[Any]]


UNSURE_HEADERS = ["where", "breed", "prob", "top-3"]
ERROR_HEADERS = ["where", "error", "run_id"]


class ExplorerPage:
    """Reads a label output once per URI (until reloaded) and answers filter changes from memory."""

    def __init__(self, thumbs: int = 24):
        self.thumbs = thumbs
        self._lock = threading.Lock()
        self._runs: explore.Runs | None = None

    def runs(self, uri: str, reload: bool = False) -> explore.Runs:
        with self._lock:
            if reload or self._runs is None or self._runs.uri != uri:
                self._runs = explore.open_runs(uri)
            return self._runs

    def view(self, uri: str, run_id: str = explore.ALL, breed: str = explore.ALL,
             threshold: float = 0.5, reload: bool = False) -> ExplorerView:
        """The explorer's outputs; a bad URI gives a message, not an exception."""
        uri = (uri or "").strip()
        if not uri:
            return _empty_view("Enter a label output (a folder or s3://bucket/prefix) and press Load.")
        try:
            runs = self.runs(uri, reload)
        except BreedlabelError as exc:
            return _empty_view(f"**Cannot read {uri}:** {exc}")
        if not runs.manifests:
            return _empty_view(f"No finished labelling run under {uri} (runs still being written are not shown).")
        rows = explore.select(runs, run_id, breed)
        unsure = explore.low_confidence(rows, threshold, limit=self.thumbs)
        errors = explore.error_rows(rows)
        all_breeds = sorted(b for b, _ in explore.breed_counts(runs.table))
        status = (f"{len(runs.manifests)} finished run(s), {runs.table.num_rows} rows; showing "
                  f"{rows.num_rows} rows, {len(unsure)} below {threshold:.0%}, {len(errors)} errors.")
        return ExplorerView(
            status=status,
            manifests=explore.manifest_rows(runs),
            run_ids=runs.run_ids,
            breeds=all_breeds,
            histogram=[(_display(b), n) for b, n in explore.breed_counts(rows)],
            unsure_gallery=_tiles(unsure, [f"{_display(r[schema.BREED])} {r[schema.PROB]:.0%}" for r in unsure]),
            unsure_rows=[[explore.where(r), _display(r[schema.BREED]), round(r[schema.PROB], 4),
                          explore.describe_top_k(r)] for r in unsure],
            error_gallery=_tiles(errors[: self.thumbs], [r[schema.ERROR] for r in errors[: self.thumbs]]),
            error_rows=[[explore.where(r), r[schema.ERROR], r[schema.RUN_ID]] for r in errors],
        )


def _tiles(rows: list[dict], captions: list[str]) -> list[tuple[np.ndarray, str]]:
    """Gallery items: a thumbnail (or a grey tile naming the error) and a caption per row."""
    arrays = explore.thumbnails(rows)
    return [(a if a is not None else placeholder(r.get(schema.ERROR) or "unreadable"),
             f"{c} — {Path(explore.where(r)).name}") for a, r, c in zip(arrays, rows, captions)]


def _empty_view(status: str) -> ExplorerView:
    return ExplorerView(status, [], [], [], [], [], [], [], [])
