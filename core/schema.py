"""Label output columns and their Arrow schema, exactly as DESIGN.md "Label output" lists them.

Writers (the label job) and readers (reports, the UI, incremental runs) import these names;
nobody spells a column name as a literal.

`run_id` is the Hive partition key (`run_id=<id>/` directories) and, as Hive and Spark's
`partitionBy` do, it is NOT stored inside the part files (FILE_SCHEMA). Why: a partition key
that also sits in the files must have the same type in both, and the readers disagree on the
key's type (pandas and `pq.read_table` infer it as dictionary, `pyarrow.dataset(...,
partitioning="hive")` as string), so any stored type breaks one of them ("Unable to merge").
Without it in the files, pandas, `pq.read_table`, `pyarrow.dataset` (hive or not) and DuckDB
all read the folder; readers that take partitions (all but a plain `pyarrow.dataset`) get
`run_id` back as a column.

`dog_score`, `is_dog` and `version` are nullable and null until the bundle and the listing
provide them, so outputs keep one schema across versions (a reader takes the first file's).
"""
from __future__ import annotations

import datetime as _dt
from typing import Sequence

import numpy as np
import pyarrow as pa

URI = "uri"
MEMBER = "member"
BYTES = "bytes"
CONTENT_SHA256 = "content_sha256"
WIDTH = "width"
HEIGHT = "height"
TOP_K = "top_k"
BREED = "breed"
PROB = "prob"
ERROR = "error"
MODEL_ID = "model_id"
RUN_ID = "run_id"
LABELLED_AT = "labelled_at"
DOG_SCORE = "dog_score"
IS_DOG = "is_dog"
VERSION = "version"

# fields of each top_k entry
BREED_ID = "breed_id"

KEY_COLUMNS = (URI, MEMBER, CONTENT_SHA256, MODEL_ID)  # what an incremental run matches on
# content_sha256 of a row whose bytes were never read (not found, access denied, too large, a link
# member): never the hash of any bytes, so an object that later turns up empty (sha256 of b"") is
# labelled, not taken for the failed read's row
UNREAD_SHA256 = ""
PARTITION_KEY = RUN_ID  # Hive-style directories: run_id=<id>/

TOP_K_TYPE = pa.list_(pa.struct([
    pa.field(BREED_ID, pa.string(), nullable=False),
    pa.field(BREED, pa.string(), nullable=False),
    pa.field(PROB, pa.float32(), nullable=False),
]))

FILE_SCHEMA = pa.schema([
    pa.field(URI, pa.string(), nullable=False),
    pa.field(MEMBER, pa.string()),
    pa.field(BYTES, pa.int64(), nullable=False),
    pa.field(CONTENT_SHA256, pa.string(), nullable=False),
    pa.field(WIDTH, pa.int32()),
    pa.field(HEIGHT, pa.int32()),
    pa.field(TOP_K, TOP_K_TYPE, nullable=False),
    pa.field(BREED, pa.string()),
    pa.field(PROB, pa.float32()),
    pa.field(ERROR, pa.string()),
    pa.field(MODEL_ID, pa.string(), nullable=False),
    pa.field(LABELLED_AT, pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field(DOG_SCORE, pa.float32()),
    pa.field(IS_DOG, pa.bool_()),
    pa.field(VERSION, pa.string()),
])
# What a reader of the folder sees: the files' columns plus the partition key, in DESIGN.md's order.
LABEL_SCHEMA = FILE_SCHEMA.insert(FILE_SCHEMA.get_field_index(MODEL_ID) + 1,
                                  pa.field(RUN_ID, pa.string(), nullable=False))


def build_table(*, uris: Sequence[str], members: Sequence[str | None], sizes: Sequence[int], sha256s: Sequence[str],
                widths: Sequence[int | None], heights: Sequence[int | None], probs: np.ndarray, labelled: np.ndarray,
                errors: Sequence[str | None], class_ids: Sequence[str], class_names: Sequence[str], model_id: str,
                k: int = 3, labelled_at: _dt.datetime | None = None, versions: Sequence[str | None] | None = None,
                dog_scores: np.ndarray | None = None, dog_threshold: float | None = None) -> pa.Table:
    """Rows for one batch (FILE_SCHEMA), built column-wise from numpy (no Python object per prediction).

    `probs` is float32 [M, C] for the M rows where `labelled` (bool [N]) is true, in order;
    the other rows get an empty `top_k` and null breed/prob. `dog_scores` (float32 [M], from a
    bundle with a dog score) fill `dog_score`, and `is_dog` = score >= `dog_threshold`; without
    them both stay null. A row with `is_dog` false keeps its `top_k` but gets no `breed`/`prob`.
    Why vectorised: this runs for every image at several hundred images per second inside the
    predict actor.
    """
    n = len(uris)
    labelled = np.asarray(labelled, dtype=bool)
    k = max(1, min(int(k), len(class_ids)))
    probs = np.asarray(probs, dtype=np.float32).reshape(-1, len(class_ids))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    top_p = np.take_along_axis(probs, order, axis=1)
    ids_arr, names_arr = pa.array(list(class_ids)), pa.array(list(class_names))
    flat = order.reshape(-1)
    struct = pa.StructArray.from_arrays(
        [ids_arr.take(flat), names_arr.take(flat), pa.array(top_p.reshape(-1), pa.float32())],
        fields=list(TOP_K_TYPE.value_type),
    )
    counts = np.where(labelled, k, 0)
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    top_k = pa.ListArray.from_arrays(pa.array(offsets), struct, type=TOP_K_TYPE)
    rows_of_labelled = np.flatnonzero(labelled)
    # a row flagged not-a-dog gets no breed: `breed`/`prob` stay null, `top_k` keeps the closest breeds
    scored = dog_scores is not None and dog_threshold is not None
    is_dog = np.asarray(dog_scores, np.float32) >= dog_threshold if scored else None
    named = is_dog if scored else np.ones(len(order), bool)
    breed = _scatter(names_arr.take(order[named, 0]) if named.any() else pa.array([], pa.string()),
                     rows_of_labelled[named], n, pa.string())
    prob = _scatter(pa.array(top_p[named, 0], pa.float32()) if named.any() else pa.array([], pa.float32()),
                    rows_of_labelled[named], n, pa.float32())
    when = labelled_at or _dt.datetime.now(_dt.timezone.utc)
    columns = [
        pa.array(uris, pa.string()),
        pa.array(members, pa.string()),
        pa.array(sizes, pa.int64()),
        pa.array(sha256s, pa.string()),
        pa.array(widths, pa.int32()),
        pa.array(heights, pa.int32()),
        top_k,
        breed,
        prob,
        pa.array(errors, pa.string()),
        pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([model_id]))
        .dictionary_decode(),
        pa.array(np.full(n, np.datetime64(when.replace(tzinfo=None), "us")), pa.timestamp("us", tz="UTC")),
        *_dog_columns(dog_scores if scored else None, is_dog, rows_of_labelled, n),
        pa.array(versions if versions is not None else [None] * n, pa.string()),
    ]
    return pa.Table.from_arrays(columns, schema=FILE_SCHEMA)


def _dog_columns(scores: np.ndarray | None, is_dog: np.ndarray | None, rows: np.ndarray, n: int) -> list[pa.Array]:
    if scores is None:
        return [pa.nulls(n, pa.float32()), pa.nulls(n, pa.bool_())]
    return [_scatter(pa.array(np.asarray(scores, np.float32), pa.float32()), rows, n, pa.float32()),
            _scatter(pa.array(is_dog, pa.bool_()), rows, n, pa.bool_())]


def _scatter(values: pa.Array, rows: np.ndarray, n: int, typ: pa.DataType) -> pa.Array:
    """`values[i]` at position `rows[i]`, null elsewhere (length n)."""
    if len(rows) == n:
        return values.cast(typ)
    index = np.full(n, -1, dtype=np.int64)
    index[rows] = np.arange(len(rows))
    mask = index < 0
    index[mask] = 0
    if len(values) == 0:
        return pa.nulls(n, typ)
    return values.take(pa.array(index, mask=mask)).cast(typ)


def with_run_id(table: pa.Table, run_id: str) -> pa.Table:
    """A part's rows as a reader of the folder sees them (LABEL_SCHEMA): the partition key added."""
    table = table.select(FILE_SCHEMA.names).cast(FILE_SCHEMA)
    index = LABEL_SCHEMA.get_field_index(RUN_ID)
    return table.add_column(index, LABEL_SCHEMA.field(RUN_ID), pa.array([run_id] * table.num_rows, pa.string()))
