"""Looking at what labelling runs found: manifests, breed counts, unsure rows, error rows.

The logic behind the UI's run explorer, kept free of Gradio so it is tested as plain
functions. Reads finished runs only (through `core.output.Output`), never a half-written run.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from core import schema
from core.errors import BreedlabelError
from core.output import Output

log = logging.getLogger(__name__)

ALL = "(all)"
COLUMNS = (schema.URI, schema.MEMBER, schema.BREED, schema.PROB, schema.ERROR, schema.RUN_ID,
           schema.TOP_K, schema.WIDTH, schema.HEIGHT)
THUMB_SIZE = (128, 128)
MANIFEST_FIELDS = ("run_id", "status", "model_id", "images", "labelled", "errors", "low_confidence",
                   "img_per_s", "wall_s", "started_at", "finished_at")


@dataclass(frozen=True)
class Runs:
    """Finished runs of one label output: their manifests and their rows (light columns)."""

    uri: str
    manifests: list[dict]
    table: pa.Table

    @property
    def run_ids(self) -> list[str]:
        return [str(m.get("run_id")) for m in self.manifests]


def open_runs(uri: str) -> Runs:
    """Read the manifests and rows of every finished run under a label output URI."""
    output = Output(uri.strip())
    return Runs(uri, output.finished_runs(), output.read_finished(columns=list(COLUMNS)))


def manifest_rows(runs: Runs) -> list[list[Any]]:
    """One row per run with the manifest fields a person compares runs by."""
    return [[_short(k, m.get(k)) for k in MANIFEST_FIELDS] for m in runs.manifests]


def _short(key: str, value: Any) -> Any:
    return value[:12] if key == "model_id" and isinstance(value, str) else value


def select(runs: Runs, run_id: str = ALL, breed: str = ALL) -> pa.Table:
    """Rows of one run (or all) and one predicted breed (or all)."""
    table = runs.table
    if run_id and run_id != ALL:
        table = table.filter(pc.equal(table.column(schema.RUN_ID), run_id))
    if breed and breed != ALL:
        table = table.filter(pc.equal(table.column(schema.BREED), breed))
    return table


def breed_counts(table: pa.Table) -> list[tuple[str, int]]:
    """(breed, labelled images), most frequent first; error rows are not counted."""
    labelled = table.filter(pc.is_valid(table.column(schema.BREED)))
    counts = pc.value_counts(labelled.column(schema.BREED)).to_pylist()
    return sorted(((c["values"], int(c["counts"])) for c in counts), key=lambda t: (-t[1], t[0]))


def low_confidence(table: pa.Table, threshold: float, limit: int = 24) -> list[dict]:
    """Labelled rows whose top-1 probability is below `threshold`, least sure first."""
    prob = table.column(schema.PROB)
    unsure = table.filter(pc.and_(pc.is_valid(prob), pc.less(prob, float(threshold))))
    unsure = unsure.sort_by([(schema.PROB, "ascending")]).slice(0, limit)
    return unsure.to_pylist()


def error_rows(table: pa.Table, limit: int = 200) -> list[dict]:
    return table.filter(pc.is_valid(table.column(schema.ERROR))).slice(0, limit).to_pylist()


def describe_top_k(row: dict) -> str:
    """"Beagle 41% · English foxhound 33% · Walker hound 12%" for a row's top_k."""
    return " · ".join(f"{p[schema.BREED].replace('_', ' ')} {p[schema.PROB]:.0%}" for p in row.get(schema.TOP_K) or [])


def where(row: dict) -> str:
    member = row.get(schema.MEMBER)
    return f"{row[schema.URI]}!{member}" if member else str(row[schema.URI])


def thumbnails(rows: list[dict], size: tuple[int, int] = THUMB_SIZE) -> list[np.ndarray | None]:
    """Small RGB arrays of the rows' images (None where unreadable), reading each archive once."""
    from core import sources

    datas: dict[int, bytes | None] = {}
    by_archive: dict[str, dict[str, list[int]]] = {}
    for i, row in enumerate(rows):
        if row.get(schema.MEMBER):
            by_archive.setdefault(row[schema.URI], {}).setdefault(row[schema.MEMBER], []).append(i)
        else:
            datas[i] = _read_file(row)
    for uri, members in by_archive.items():
        try:
            for got in sources.iter_archive_members(uri, extensions=None, members=set(members)):
                for i in members.get(got.item.member or "", []):
                    datas[i] = got.data
        except BreedlabelError as exc:
            log.info("explorer: cannot read archive %s (%s)", uri, exc)
    return [_decode(datas.get(i), row, size) for i, row in enumerate(rows)]


def _read_file(row: dict) -> bytes | None:
    from core import sources

    try:
        return sources.read_item(sources.InputItem(row[schema.URI]))
    except BreedlabelError as exc:
        log.info("explorer: cannot read %s (%s)", where(row), exc)
        return None


def _decode(data: bytes | None, row: dict, size: tuple[int, int]) -> np.ndarray | None:
    from core.images import decode_image

    if not data:
        return None
    try:
        return decode_image(data, size=size, source=where(row)).array
    except BreedlabelError:
        return None
