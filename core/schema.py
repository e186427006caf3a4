"""Label output columns and their Arrow schema, exactly as DESIGN.md "Label output" lists them.

Writers (the label job) and readers (reports, the UI, incremental runs) import these names;
nobody spells a column name as a literal. One deliberate detail: `run_id` is stored
dictionary-encoded (still a Parquet STRING column). pandas reads a Hive-partitioned folder
with `run_id=…` directories as a *dictionary* partition key, and refuses to merge it with a
plain-string `run_id` inside the files ("Unable to merge: string vs dictionary"); with the
dictionary type pandas, pyarrow (`pq.read_table`, `ds.dataset`) and DuckDB all read it.
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

# fields of each top_k entry
BREED_ID = "breed_id"

KEY_COLUMNS = (URI, MEMBER, CONTENT_SHA256, MODEL_ID)  # what an incremental run matches on
PARTITION_KEY = RUN_ID  # Hive-style directories: run_id=<id>/

TOP_K_TYPE = pa.list_(pa.struct([
    pa.field(BREED_ID, pa.string(), nullable=False),
    pa.field(BREED, pa.string(), nullable=False),
    pa.field(PROB, pa.float32(), nullable=False),
]))
RUN_ID_TYPE = pa.dictionary(pa.int32(), pa.string())

LABEL_SCHEMA = pa.schema([
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
    pa.field(RUN_ID, RUN_ID_TYPE, nullable=False),
    pa.field(LABELLED_AT, pa.timestamp("us", tz="UTC"), nullable=False),
])


def empty_table() -> pa.Table:
    return LABEL_SCHEMA.empty_table()


def build_table(
    *,
    uris: Sequence[str],
    members: Sequence[str | None],
    sizes: Sequence[int],
    sha256s: Sequence[str],
    widths: Sequence[int | None],
    heights: Sequence[int | None],
    probs: np.ndarray,
    labelled: np.ndarray,
    errors: Sequence[str | None],
    class_ids: Sequence[str],
    class_names: Sequence[str],
    model_id: str,
    run_id: str,
    k: int = 3,
    labelled_at: _dt.datetime | None = None,
) -> pa.Table:
    """Rows for one batch, built column-wise from numpy (no Python object per prediction).

    `probs` is float32 [M, C] for the M rows where `labelled` (bool [N]) is true, in order;
    the other rows get an empty `top_k` and null breed/prob. Why vectorised: this runs for
    every image at several hundred images per second inside the predict actor.
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
    breed = _scatter(names_arr.take(order[:, 0]) if len(order) else pa.array([], pa.string()),
                     rows_of_labelled, n, pa.string())
    prob = _scatter(pa.array(top_p[:, 0], pa.float32()) if len(order) else pa.array([], pa.float32()),
                    rows_of_labelled, n, pa.float32())
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
        pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([run_id])),
        pa.array(np.full(n, np.datetime64(when.replace(tzinfo=None), "us")), pa.timestamp("us", tz="UTC")),
    ]
    return pa.Table.from_arrays(columns, schema=LABEL_SCHEMA)


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


def conform(table: pa.Table) -> pa.Table:
    """Cast a table read back (e.g. through Ray's Arrow blocks) to LABEL_SCHEMA, column order too."""
    return table.select(LABEL_SCHEMA.names).cast(LABEL_SCHEMA)
