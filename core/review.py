"""A review queue from a label output: Label Studio tasks, most uncertain first.

Reviewing every row of a million-image run is impossible; reviewing the few hundred the model
was least sure of is an afternoon. A row's `uncertainty` (0..1) is the larger of two:

- dog: 1 at the dog-score threshold, falling linearly to 0 at a score of 0 or 1, so rows the
  not-a-dog flag nearly went the other way come first (a bundle without a dog score: 0);
- breed, for rows taken for dogs: 1 - (top-1 prob - top-2 prob), the margin between the two best
  breeds. A row flagged "not a dog" has no breed to doubt: a clear cat is not worth a look.

Tasks follow Label Studio's import format (labelstud.io/guide/predictions): `data.image` is the
image URI (an `s3://` URI resolves through Label Studio's S3 storage; a local photo is a
`/data/local-files/?d=` URL of its local-files server), `data.uri` the row's own, and `predictions` holds
the top-k breeds, one prediction each, as `choices` of the control named `breed` with their
probability as the score. Archive members have no URI Label Studio can open: they are skipped
and counted. Error rows have nothing to review. An input labelled again (`--relabel`, another
model) is one task, from its newest row.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from core import output, schema, storage
from core.dog_score import THRESHOLD
from core.errors import ConfigError

FROM_NAME = "breed"
TO_NAME = "image"
NOT_A_DOG = "not a dog"
COLUMNS = (schema.URI, schema.MEMBER, schema.TOP_K, schema.ERROR, schema.DOG_SCORE, schema.IS_DOG,
           schema.MODEL_ID, schema.RUN_ID, schema.LABELLED_AT)
LOCAL_FILES_URL = "/data/local-files/?d="  # Label Studio's local-files server


@dataclass(frozen=True)
class Queue:
    tasks: list[dict]
    inputs: int  # labelled inputs considered (one task each, before --limit)
    rows: int  # every row of the runs read: a relabelled input has several, error rows count
    skipped_members: int  # archive members (no URI to open)


def uncertainty(top_probs: np.ndarray, dog_scores: np.ndarray,
                threshold: float | np.ndarray | None) -> np.ndarray:
    """Per row, the larger of the dog flag's and (for rows taken for dogs) the breed margin's
    uncertainty (see module doc). `top_probs` [N, >=2] sorted descending; `dog_scores` [N] with
    nan where there is none; `threshold` one for all rows or one per row."""
    top_probs = np.asarray(top_probs, np.float64)
    second = top_probs[:, 1] if top_probs.shape[1] > 1 else np.zeros(len(top_probs))
    breed = 1.0 - (top_probs[:, 0] - second)
    dog = np.zeros(len(top_probs))
    scores = np.asarray(dog_scores, np.float64)
    if threshold is not None:
        span = np.where(scores >= threshold, 1.0 - threshold, threshold)
        dog = np.where(np.isnan(scores), 0.0, 1.0 - np.abs(scores - threshold) / np.maximum(span, 1e-9))
        breed = np.where(scores < threshold, 0.0, breed)  # nan compares False: a breed to doubt
    return np.clip(np.maximum(breed, dog), 0.0, 1.0)


def newest_per_input(rows: pa.Table) -> pa.Table:
    """One row per input (uri, member): the newest `labelled_at`, the row a reader is told to trust
    when a `--relabel` or another model labelled the input again."""
    order = pc.sort_indices(rows, sort_keys=[(schema.LABELLED_AT, "descending")])
    rows = rows.take(order)
    seen: set = set()
    keep = [key not in seen and not seen.add(key)
            for key in zip(rows.column(schema.URI).to_pylist(), rows.column(schema.MEMBER).to_pylist())]
    return rows.filter(pa.array(keep, pa.bool_()))


def image_url(uri: str, local_files_root: str) -> str:
    """What Label Studio opens: an s3:// URI as is (its S3 storage resolves it); a local photo
    through its local-files server, relative to LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT."""
    if storage.is_s3(uri):
        return uri
    path = os.path.abspath(storage.parse_uri(uri).path)
    root = os.path.abspath(local_files_root)
    if os.path.commonpath([path, root]) != root:
        raise ConfigError(f"{uri}: not under --local-files-root {local_files_root}; give a root that holds every "
                          "local photo (Label Studio's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT)")
    return LOCAL_FILES_URL + quote(os.fsencode(os.path.relpath(path, root)), safe="/")  # a non-UTF-8 name: its bytes


def run_thresholds(manifests: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The dog-score threshold each finished run flagged its rows with: the run's `--dog-threshold`
    as its manifest's config records it (since the threshold is recorded there resolved, the card's
    when none was given); THRESHOLD, every card's, for older runs that left it null."""
    thresholds = {}
    for manifest in manifests:
        given = (manifest.get(output.M_CONFIG) or {}).get("dog_threshold")
        thresholds[manifest[output.M_RUN_ID]] = THRESHOLD if given is None else float(given)
    return thresholds


def build_queue(rows: pa.Table, *, threshold: float | None = None, run_thresholds: Mapping[str, float] | None = None,
                limit: int | None = None, local_files_root: str = "/") -> Queue:
    """Tasks for the labelled rows of `rows` (columns COLUMNS), one per input (its newest row), most
    uncertain first, at most `limit`. With a `threshold`, every row with a dog score is flagged
    (and ordered) by it, as a rerun with that `--dog-threshold` would have; without one, a row keeps
    its own `is_dog` and is ordered by its run's threshold (`run_thresholds`, else THRESHOLD)."""
    read = rows.num_rows
    rows = newest_per_input(rows)
    labelled = rows.filter(pc.is_null(rows.column(schema.ERROR)))
    members = labelled.column(schema.MEMBER).to_pylist()
    keep = [m is None for m in members]
    skipped = len(keep) - sum(keep)
    labelled = labelled.filter(pa.array(keep, pa.bool_()))
    top_k = labelled.column(schema.TOP_K).to_pylist()
    width = max((len(t) for t in top_k), default=1)
    probs = np.array([[c[schema.PROB] for c in t] + [0.0] * (width - len(t)) for t in top_k]).reshape(-1, width)
    dog = np.array([np.nan if s is None else s for s in labelled.column(schema.DOG_SCORE).to_pylist()])
    runs = labelled.column(schema.RUN_ID).to_pylist()
    flags = labelled.column(schema.IS_DOG).to_pylist()
    if threshold is None:
        per_run = run_thresholds or {}
        thresholds = np.array([per_run.get(r, THRESHOLD) for r in runs], np.float64)
    else:
        thresholds = np.full(len(runs), float(threshold))
        # float32, as the label run compares (a score stored as 0.7f is at the threshold 0.7, not below)
        flags = [flag if np.isnan(s) else bool(np.float32(s) >= np.float32(threshold)) for flag, s in zip(flags, dog)]
    score = uncertainty(probs, dog, thresholds)
    uris = labelled.column(schema.URI).to_pylist()
    order = sorted(range(len(uris)), key=lambda i: (-score[i], uris[i]))[:limit]
    models = labelled.column(schema.MODEL_ID).to_pylist()
    tasks = [_task(uris[i], image_url(uris[i], local_files_root), top_k[i], dog[i], flags[i], models[i], runs[i],
                   score[i]) for i in order]
    return Queue(tasks, len(uris), read, skipped)


def _task(uri: str, image: str, top_k: Sequence[dict], dog_score: float, is_dog: bool | None, model_id: str,
          run_id: str, score: float) -> dict[str, Any]:
    version = model_id[:12]
    predictions = [{"model_version": f"{version} top-{rank}", "score": round(float(c[schema.PROB]), 6),
                    "result": [{"from_name": FROM_NAME, "to_name": TO_NAME, "type": "choices",
                                "value": {"choices": [c[schema.BREED]]}}]}
                   for rank, c in enumerate(top_k, 1)]
    if is_dog is False:  # the flag first: what the reviewer confirms or rejects
        predictions.insert(0, {"model_version": f"{version} dog-score", "score": round(1.0 - dog_score, 6),
                               "result": [{"from_name": FROM_NAME, "to_name": TO_NAME, "type": "choices",
                                           "value": {"choices": [NOT_A_DOG]}}]})
    return {"data": {TO_NAME: image, "uri": uri, "uncertainty": round(float(score), 6),
                     "dog_score": None if np.isnan(dog_score) else round(float(dog_score), 6), "is_dog": is_dog,
                     "model_id": model_id, "run_id": run_id},
            "predictions": predictions}


def labeling_config(breeds: Sequence[str]) -> str:
    """The Label Studio labeling interface the tasks fit: one image, one choice among the breeds
    and "not a dog"."""
    from xml.sax.saxutils import quoteattr

    choices = "\n".join(f"    <Choice value={quoteattr(b)}/>" for b in [*breeds, NOT_A_DOG])
    return (f'<View>\n  <Image name="{TO_NAME}" value="${TO_NAME}"/>\n'
            f'  <Choices name="{FROM_NAME}" toName="{TO_NAME}" choice="single" showInline="false">\n'
            f"{choices}\n  </Choices>\n</View>\n")
