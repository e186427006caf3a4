"""Read -> hash -> skip -> decode -> infer -> rows: the one path from input objects to label rows.

The label job's actors run it on each chunk of the listing (jobs.label_pipeline only carries
chunks to them), `breedlabel predict`, `evaluate` and the UI run it through core.predict, and
tests run it on a plain table without Ray. A chunk is an Arrow table (`chunk_table`): `uri`,
`member` (archive member or null), `data` (bytes already read, e.g. archive members read in
one pass by the listing, else null) and `error` (a reason known before reading, e.g. a corrupt
archive). Per-object problems become the row's `error` (core.reasons), never an exception.

Why threads: on a CPU node one actor holds all the cores it labels with; reading, hashing
(hashlib) and decoding (simplejpeg/PIL) release the GIL, so `decode_threads` threads decode
a chunk on all cores, then the runtime infers it on all cores. The two phases alternate
instead of overlapping, so runtime threads + decode threads never fight over the cores.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa

from core import schema
from core.bundle import Bundle
from core.errors import ImageDecodeError, InputError, ServiceError, StorageError
from core.images import decode_image
from core.reasons import REASON_INTERNAL, REASON_UNREADABLE
from core.runtime import Outputs, Runtime, describe_runtime, load_runtime
from core.skipset import contains_all, content_key
from core.sources import MAX_OBJECT_BYTES, InputItem, ItemData, MemberError, read_item
from core.storage import NotAFileError, ObjectForbiddenError, ObjectNotFoundError, ObjectTooLargeError, S3Options

log = logging.getLogger(__name__)

# chunk columns between the listing, the decode stage and the predict stage
COL_URI = schema.URI
COL_MEMBER = schema.MEMBER
COL_DATA = "data"
COL_ERROR = schema.ERROR
COL_VERSION = schema.VERSION
COL_IMAGE = "image"          # decoded uint8 H*W*3 bytes (two-stage pipeline only)
SKIPPED = "_skipped"         # extra output column: row already labelled in a finished run
CHUNK_SCHEMA = pa.schema([pa.field(COL_URI, pa.string()), pa.field(COL_MEMBER, pa.string()),
                          pa.field(COL_DATA, pa.binary()), pa.field(COL_ERROR, pa.string()),
                          pa.field(COL_VERSION, pa.string())])
RUNTIME_META = b"breedlabel.runtime"     # output schema metadata: what this actor really runs
FALLBACK_META = b"breedlabel.fallback"   # ... and why, when `auto` fell back to TensorFlow
SECONDS_META = b"breedlabel.seconds"     # ... and how long the chunk took it (read, decode, infer)

Reader = Callable[[str, "str | None"], bytes]


def read_object(uri: str, member: str | None, s3: S3Options | None = None, max_bytes: int = MAX_OBJECT_BYTES) -> bytes:
    """Bytes of a plain object, or of one archive member named by a manifest (rare: listed
    archives arrive with their members' bytes, read in one pass by the listing)."""
    return read_item(InputItem(uri, member), s3=s3, max_bytes=max_bytes)


def reader(s3: S3Options | None = None, max_bytes: int = MAX_OBJECT_BYTES) -> Reader:
    """`read_object` bound to a run's S3 settings (timeouts, attempts) and size cap."""
    return functools.partial(read_object, s3=s3, max_bytes=max_bytes)


def chunk_table(items: Sequence[ItemData]) -> pa.Table:
    """Listed items (with bytes where the listing read them) -> the chunk an actor labels."""
    return pa.table({COL_URI: [it.item.uri for it in items], COL_MEMBER: [it.item.member for it in items],
                     COL_DATA: [it.data for it in items], COL_ERROR: [it.error for it in items],
                     COL_VERSION: [it.item.version for it in items]}, schema=CHUNK_SCHEMA)


@dataclass
class Fetched:
    """Per item of a chunk: bytes (or None), size, sha256 hex, error reason (or None)."""

    datas: list[bytes | None]
    sizes: list[int]
    shas: list[str]
    errors: list[str | None]


def _fetch_one(uri: str, member: str | None, data: bytes | None, error: str | None, read: Reader) -> tuple:
    """An object the service says is missing or forbidden is this row's error; a service that does
    not answer (ServiceError) is raised: it fails the run instead of failing every row."""
    if error is None and data is None:
        try:
            data = read(uri, member)
        except (ObjectNotFoundError, ObjectForbiddenError, ObjectTooLargeError, NotAFileError, MemberError) as exc:
            error = exc.reason
        except ServiceError:
            raise
        except (StorageError, InputError) as exc:
            log.warning("cannot read %s%s: %s", uri, f" [{member}]" if member else "", exc)
            error = REASON_UNREADABLE
    if data is None:
        return None, 0, schema.UNREAD_SHA256, error
    return (data if error is None else None, len(data), hashlib.sha256(data).hexdigest(), error)


def fetch(uris: Sequence[str], members: Sequence[str | None], datas: Sequence[bytes | None] | None = None,
          errors: Sequence[str | None] | None = None, pool: ThreadPoolExecutor | None = None,
          read: Reader = read_object) -> Fetched:
    """Read (where not given) and hash every item; read failures become reasons, never raise."""
    n = len(uris)
    args = [(uris[i], members[i], None if datas is None else datas[i], None if errors is None else errors[i], read)
            for i in range(n)]
    results = list(pool.map(lambda a: _fetch_one(*a), args)) if pool else [_fetch_one(*a) for a in args]
    d, s, h, e = zip(*results) if results else ((), (), (), ())
    return Fetched(list(d), list(s), list(h), list(e))


def decode_into(datas: Sequence[bytes | None], sources: Sequence[str], size: tuple[int, int], policy: str,
                pool: ThreadPoolExecutor | None) -> tuple[np.ndarray, np.ndarray, list, list, list]:
    """Decode into one preallocated uint8 [N,H,W,3] array (no per-image copies to stack).

    Returns (images, ok mask, widths, heights, reasons); items whose data is None are not ok.
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
            img = decode_image(datas[i], size=size, policy=policy, source=sources[i])
            images[i] = img.array
            widths[i], heights[i] = img.width, img.height
        except ImageDecodeError as exc:
            reasons[i] = exc.reason
        except Exception as exc:  # a decoder bug must cost one row, not the job
            log.warning("decoding %s failed unexpectedly: %s: %s", sources[i], type(exc).__name__, exc)
            reasons[i] = REASON_INTERNAL

    list(pool.map(one, range(n))) if pool else [one(i) for i in range(n)]
    ok = np.array([widths[i] is not None for i in range(n)], dtype=bool)
    return images, ok, widths, heights, reasons


def infer(runtime: Runtime, images: np.ndarray, ok: np.ndarray, num_classes: int) -> Outputs:
    """Probabilities [M, C] (and dog scores [M] where the bundle has them) of the M decoded
    images (rows where `ok`), in order."""
    if not ok.any():
        return Outputs(np.zeros((0, num_classes), np.float32), None)
    return runtime.infer(images[ok])


def skip_mask(uris: Sequence[str], members: Sequence[str | None], shas: Sequence[str],
              model_id: str, done_keys: np.ndarray | None) -> np.ndarray:
    """True where the content key (uri, member, sha, model_id) is in the sorted key-set `done_keys`."""
    if done_keys is None or len(done_keys) == 0:
        return np.zeros(len(uris), dtype=bool)
    keys = np.fromiter((content_key(u, m, s, model_id) for u, m, s in zip(uris, members, shas)), np.uint64,
                       count=len(uris))
    return contains_all(done_keys, keys)


def _row_errors(fetched_errors, decode_reasons, ok, skipped) -> list[str | None]:
    """Each row's reason; a skipped row keeps a read failure's (it failed as in the finished run:
    the next run must read it again, core.skipset), and has none otherwise (it was not decoded)."""
    return [None if ok[i] else fetched_errors[i] if skipped[i]
            else (fetched_errors[i] or decode_reasons[i] or REASON_INTERNAL) for i in range(len(ok))]


def _columns(chunk: pa.Table) -> tuple[list, list]:
    uris = chunk.column(COL_URI).to_pylist()
    members = chunk.column(COL_MEMBER).to_pylist() if COL_MEMBER in chunk.column_names else [None] * len(uris)
    return uris, members


def _versions(chunk: pa.Table) -> list:
    return chunk.column(COL_VERSION).to_pylist() if COL_VERSION in chunk.column_names else [None] * chunk.num_rows


def _timed(rows: pa.Table, start: float) -> pa.Table:
    meta = {**(rows.schema.metadata or {}), SECONDS_META: f"{time.perf_counter() - start:.6f}".encode()}
    return rows.replace_schema_metadata(meta)


def decode_chunk(chunk: pa.Table, *, size: tuple[int, int], policy: str, model_id: str,
                 done_keys: np.ndarray | None = None, read: Reader = read_object, io_threads: int = 8) -> pa.Table:
    """CPU decode stage of the two-stage pipeline (GPU actors): the input of `label_decoded`."""
    uris, members = _columns(chunk)
    with ThreadPoolExecutor(max(1, io_threads)) as pool:
        got = fetch(uris, members, chunk.column(COL_DATA).to_pylist(), chunk.column(COL_ERROR).to_pylist(), pool, read)
    skipped = skip_mask(uris, members, got.shas, model_id, done_keys)
    datas = [None if s else d for d, s in zip(got.datas, skipped)]
    images, ok, widths, heights, reasons = decode_into(datas, _sources(uris, members), size, policy, None)
    return pa.table({
        COL_URI: pa.array(uris, pa.string()), COL_MEMBER: pa.array(members, pa.string()),
        schema.BYTES: pa.array(got.sizes, pa.int64()), schema.CONTENT_SHA256: pa.array(got.shas, pa.string()),
        schema.WIDTH: pa.array(widths, pa.int32()), schema.HEIGHT: pa.array(heights, pa.int32()),
        COL_ERROR: pa.array(_row_errors(got.errors, reasons, ok, skipped), pa.string()),
        COL_VERSION: pa.array(_versions(chunk), pa.string()),
        SKIPPED: pa.array(skipped, pa.bool_()),
        COL_IMAGE: pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(int(np.prod(images.shape[1:]))), len(images), [None, pa.py_buffer(images)]),
    })


def _sources(uris: Sequence[str], members: Sequence[str | None]) -> list[str]:
    return [u if m is None else f"{u}[{m}]" for u, m in zip(uris, members)]


class BatchLabeller:
    """Owns the runtime and the thread pools of one actor; `label(chunk)` -> Arrow rows."""

    def __init__(self, bundle: Bundle, *, runtime: str = "auto", threads: int | None = None,
                 decode_threads: int = 1, io_threads: int = 8, top_k: int = 3,
                 done_keys: np.ndarray | None = None, read: Reader = read_object,
                 dog_threshold: float | None = None, **runtime_options):
        self.bundle = bundle
        self.dog_threshold = dog_threshold if dog_threshold is not None else bundle.dog_threshold
        self.runtime = load_runtime(bundle, runtime, threads, **runtime_options)
        self.size = bundle.input_size
        self.policy = bundle.resize_policy
        self.class_ids = [c.id for c in bundle.classes]
        self.class_names = [c.name for c in bundle.classes]
        self.top_k, self.done_keys = top_k, done_keys
        self.read = read
        self._decode_pool = ThreadPoolExecutor(decode_threads) if decode_threads > 1 else None
        self._io_pool = ThreadPoolExecutor(io_threads) if io_threads > 1 else None
        self._meta = {RUNTIME_META: describe_runtime(self.runtime).encode()}
        if getattr(self.runtime, "fallback", None):
            self._meta[FALLBACK_META] = str(self.runtime.fallback).encode()

    def label(self, chunk: pa.Table) -> pa.Table:
        """Rows for every item of the chunk (FILE_SCHEMA + SKIPPED); nothing is dropped."""
        start = time.perf_counter()
        uris, members = _columns(chunk)
        got = fetch(uris, members, chunk.column(COL_DATA).to_pylist(), chunk.column(COL_ERROR).to_pylist(),
                    self._io_pool, self.read)
        skipped = skip_mask(uris, members, got.shas, self.bundle.model_id, self.done_keys)
        datas = [None if s else d for d, s in zip(got.datas, skipped)]
        images, ok, widths, heights, reasons = decode_into(datas, _sources(uris, members), self.size, self.policy,
                                                           self._decode_pool)
        outputs = infer(self.runtime, images, ok, len(self.class_ids))
        rows = self._rows(uris, members, got.sizes, got.shas, skipped, ok, widths, heights,
                          _row_errors(got.errors, reasons, ok, skipped), outputs, _versions(chunk))
        return _timed(rows, start)

    def label_decoded(self, decoded: pa.Table) -> pa.Table:
        """Predict stage of the two-stage pipeline: `decoded` comes from `decode_chunk`."""
        start = time.perf_counter()
        uris, members = _columns(decoded)
        errors = decoded.column(COL_ERROR).to_pylist()
        skipped = np.asarray(decoded.column(SKIPPED).to_pylist(), dtype=bool)
        ok = np.array([e is None and not s for e, s in zip(errors, skipped)], dtype=bool)
        raw = decoded.column(COL_IMAGE).combine_chunks().buffers()[1]
        images = np.frombuffer(raw, np.uint8, count=len(uris) * self.size[0] * self.size[1] * 3).reshape(
            len(uris), self.size[0], self.size[1], 3)
        outputs = infer(self.runtime, images, ok, len(self.class_ids))
        rows = self._rows(uris, members, decoded.column(schema.BYTES).to_pylist(),
                          decoded.column(schema.CONTENT_SHA256).to_pylist(), skipped, ok,
                          decoded.column(schema.WIDTH).to_pylist(), decoded.column(schema.HEIGHT).to_pylist(),
                          errors, outputs, _versions(decoded))
        return _timed(rows, start)

    def _rows(self, uris, members, sizes, shas, skipped, ok, widths, heights, errors, outputs: Outputs,
              versions) -> pa.Table:
        table = schema.build_table(
            uris=uris, members=members, sizes=sizes, sha256s=shas,
            widths=[w if ok[i] else None for i, w in enumerate(widths)],
            heights=[h if ok[i] else None for i, h in enumerate(heights)],
            probs=outputs.probs, labelled=ok, errors=errors, class_ids=self.class_ids,
            class_names=self.class_names, model_id=self.bundle.model_id, k=self.top_k, versions=versions,
            dog_scores=outputs.dog_score, dog_threshold=self.dog_threshold)
        table = table.append_column(SKIPPED, pa.array(np.asarray(skipped, dtype=bool)))
        return table.replace_schema_metadata(self._meta)
