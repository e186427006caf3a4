"""Label one batch of input objects: read bytes, hash, skip done ones, decode, predict, rows.

This is the loop inside the label job's actors (jobs/label.py only wraps it for Ray), so it
is unit-tested on a plain batch without Ray. A batch is a dict of columns, as Ray Data hands
it over: `uri`, `member` (archive member or None), `data` (bytes already read, e.g. archive
members, else None) and `error` (a reason known before reading, e.g. a corrupt archive).

Why threads: on a CPU node one actor holds all the cores it labels with; reading, hashing
(hashlib) and decoding (simplejpeg/PIL) release the GIL, so `decode_threads` threads decode
a batch on all cores, then the runtime infers it on all cores. The two phases alternate
instead of overlapping, so runtime threads + decode threads never fight over the cores.
"""
from __future__ import annotations

import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import pyarrow as pa

from core import schema
from core.bundle import Bundle
from core.errors import ImageDecodeError, InputError, StorageError
from core.images import decode_image
from core.output import in_key_set, key_hash
from core.storage import ObjectNotFoundError

log = logging.getLogger(__name__)

# batch columns between the listing, the decode stage and the predict stage
COL_URI = schema.URI
COL_MEMBER = schema.MEMBER
COL_DATA = "data"
COL_ERROR = schema.ERROR
COL_IMAGE = "image"          # decoded uint8 [H,W,3] (two-stage pipeline only)
COL_OK = "ok"
SKIPPED = "_skipped"         # extra output column: row already labelled in a finished run
REASON_UNREADABLE = "cannot read"
REASON_INTERNAL = "internal error"

Reader = Callable[[str, "str | None"], bytes]


def read_object(uri: str, member: str | None) -> bytes:
    """Bytes of a plain object, or of one archive member named by a manifest (rare: listed
    archives arrive with their members' bytes, read in one pass by the listing)."""
    from core.sources import InputItem, read_item

    return read_item(InputItem(uri, member))


@dataclass
class Fetched:
    """Per item of a batch: bytes (or None), size, sha256 hex, error reason (or None)."""

    datas: list[bytes | None]
    sizes: list[int]
    shas: list[str]
    errors: list[str | None]


def _fetch_one(uri: str, member: str | None, data: bytes | None, error: str | None, read: Reader) -> tuple:
    if error is None and data is None:
        try:
            data = read(uri, member)
        except ObjectNotFoundError as exc:
            error = exc.reason
        except (StorageError, InputError) as exc:
            log.warning("cannot read %s%s: %s", uri, f" [{member}]" if member else "", exc)
            error = REASON_UNREADABLE
    payload = data if data is not None else b""
    return (data if error is None else None, len(payload), hashlib.sha256(payload).hexdigest(), error)


def fetch(batch: Mapping[str, Sequence], pool: ThreadPoolExecutor | None, read: Reader = read_object) -> Fetched:
    """Read (where not given) and hash every item; read failures become reasons, never raise."""
    uris, members = batch[COL_URI], batch[COL_MEMBER]
    datas = batch.get(COL_DATA)
    errors = batch.get(COL_ERROR)
    n = len(uris)
    args = [(uris[i], members[i], None if datas is None else datas[i], None if errors is None else errors[i], read)
            for i in range(n)]
    results = list(pool.map(lambda a: _fetch_one(*a), args)) if pool else [_fetch_one(*a) for a in args]
    d, s, h, e = zip(*results) if results else ((), (), (), ())
    return Fetched(list(d), list(s), list(h), list(e))


def decode_into(datas: Sequence[bytes | None], uris: Sequence[str], size: tuple[int, int], policy: str,
                pool: ThreadPoolExecutor | None) -> tuple[np.ndarray, np.ndarray, list, list, list]:
    """Decode into one preallocated uint8 [N,H,W,3] array (no per-image copies to stack).

    Returns (images, ok mask, widths, heights, reasons); rows with data None are not ok.
    """
    n = len(datas)
    images = np.zeros((n, size[0], size[1], 3), np.uint8)
    widths: list[int | None] = [None] * n
    heights: list[int | None] = [None] * n
    reasons: list[str | None] = [None] * n

    def one(i: int) -> None:
        if datas[i] is None:
            return
        try:
            img = decode_image(datas[i], size=size, policy=policy, source=uris[i])
            images[i] = img.array
            widths[i], heights[i] = img.width, img.height
        except ImageDecodeError as exc:
            reasons[i] = exc.reason
        except Exception as exc:  # a decoder bug must cost one row, not the job
            log.warning("decoding %s failed unexpectedly: %s: %s", uris[i], type(exc).__name__, exc)
            reasons[i] = REASON_INTERNAL

    list(pool.map(one, range(n))) if pool else [one(i) for i in range(n)]
    ok = np.array([widths[i] is not None for i in range(n)], dtype=bool)
    return images, ok, widths, heights, reasons


def skip_mask(uris: Sequence[str], members: Sequence[str | None], shas: Sequence[str],
              model_id: str, done: np.ndarray | None) -> np.ndarray:
    """True where (uri, member, sha, model_id) is in the sorted key-set `done`."""
    if done is None or len(done) == 0:
        return np.zeros(len(uris), dtype=bool)
    return np.array([in_key_set(done, key_hash(u, m, s, model_id)) for u, m, s in zip(uris, members, shas)],
                    dtype=bool)


class BatchLabeller:
    """Owns the runtime and the thread pools of one actor; `label(batch)` -> Arrow rows."""

    def __init__(self, bundle: Bundle, *, runtime: str = "auto", threads: int | None = None,
                 decode_threads: int = 1, io_threads: int = 8, top_k: int = 3, run_id: str = "",
                 done_keys: np.ndarray | None = None, read: Reader = read_object, **runtime_options):
        from core.runtime import load_runtime

        self.bundle = bundle
        self.runtime = load_runtime(bundle, runtime, threads, **runtime_options)
        self.size = bundle.input_size
        self.policy = bundle.resize_policy
        self.class_ids = [c.id for c in bundle.classes]
        self.class_names = [c.name for c in bundle.classes]
        self.top_k, self.run_id, self.done = top_k, run_id, done_keys
        self.read = read
        self._decode_pool = ThreadPoolExecutor(decode_threads) if decode_threads > 1 else None
        self._io_pool = ThreadPoolExecutor(io_threads) if io_threads > 1 else None

    def label(self, batch: Mapping[str, Sequence]) -> pa.Table:
        """Rows for every item of the batch (LABEL_SCHEMA + SKIPPED); nothing is dropped."""
        got = fetch(batch, self._io_pool, self.read)
        uris, members = list(batch[COL_URI]), list(batch[COL_MEMBER])
        skipped = skip_mask(uris, members, got.shas, self.bundle.model_id, self.done)
        datas = [None if s else d for d, s in zip(got.datas, skipped)]
        images, ok, widths, heights, reasons = decode_into(datas, uris, self.size, self.policy, self._decode_pool)
        probs = self.runtime.predict(images[ok]) if ok.any() else np.zeros((0, len(self.class_ids)), np.float32)
        return self.rows(uris, members, got, skipped, ok, widths, heights, reasons, probs)

    def label_decoded(self, batch: Mapping[str, Sequence]) -> pa.Table:
        """Predict stage of the two-stage pipeline: `batch` comes from `decode_batch`."""
        ok = np.asarray(batch[COL_OK], dtype=bool)
        images = np.asarray(batch[COL_IMAGE])
        probs = self.runtime.predict(images[ok]) if ok.any() else np.zeros((0, len(self.class_ids)), np.float32)
        got = Fetched([], list(batch[schema.BYTES]), list(batch[schema.CONTENT_SHA256]), list(batch[COL_ERROR]))
        skipped = np.asarray(batch[SKIPPED], dtype=bool)
        none = [None] * len(ok)
        return self.rows(list(batch[COL_URI]), list(batch[COL_MEMBER]), got, skipped, ok,
                         list(batch[schema.WIDTH]), list(batch[schema.HEIGHT]), none, probs)

    def rows(self, uris, members, got: Fetched, skipped, ok, widths, heights, reasons, probs) -> pa.Table:
        members = [m if isinstance(m, str) else None for m in members]  # an all-null column may come back as NaN
        errors = [None if (ok[i] or skipped[i]) else (got.errors[i] or reasons[i] or REASON_INTERNAL)
                  for i in range(len(uris))]
        table = schema.build_table(
            uris=uris, members=members, sizes=got.sizes, sha256s=got.shas,
            widths=[w if ok[i] else None for i, w in enumerate(widths)],
            heights=[h if ok[i] else None for i, h in enumerate(heights)],
            probs=probs, labelled=ok, errors=errors, class_ids=self.class_ids, class_names=self.class_names,
            model_id=self.bundle.model_id, run_id=self.run_id, k=self.top_k)
        return table.append_column(SKIPPED, pa.array(np.asarray(skipped, dtype=bool)))


def decode_batch(batch: Mapping[str, Sequence], *, size: tuple[int, int], policy: str, model_id: str,
                 done: np.ndarray | None = None, read: Reader = read_object,
                 io_threads: int = 8) -> dict[str, np.ndarray]:
    """CPU decode stage of the two-stage pipeline (GPU actors): columns for `label_decoded`."""
    pool = ThreadPoolExecutor(io_threads) if io_threads > 1 else None
    try:
        got = fetch(batch, pool, read)
    finally:
        if pool:
            pool.shutdown()
    uris, members = list(batch[COL_URI]), list(batch[COL_MEMBER])
    skipped = skip_mask(uris, members, got.shas, model_id, done)
    datas = [None if s else d for d, s in zip(got.datas, skipped)]
    images, ok, widths, heights, reasons = decode_into(datas, uris, size, policy, None)
    errors = [None if (ok[i] or skipped[i]) else (got.errors[i] or reasons[i] or REASON_INTERNAL)
              for i in range(len(uris))]
    return {
        COL_URI: np.array(uris, dtype=object), COL_MEMBER: np.array(members, dtype=object),
        schema.BYTES: np.array(got.sizes, np.int64), schema.CONTENT_SHA256: np.array(got.shas, dtype=object),
        schema.WIDTH: np.array([w or 0 for w in widths], np.int32),
        schema.HEIGHT: np.array([h or 0 for h in heights], np.int32),
        COL_ERROR: np.array(errors, dtype=object), COL_OK: ok, SKIPPED: skipped, COL_IMAGE: images,
    }
