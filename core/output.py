"""Where a labelling run's Parquet goes, and how a run becomes visible only when it is whole.

Layout under the output URI (local path or s3://):

    _lease.json                                  who is writing now (core.lease)
    _last_run.json                               the manifest of the newest run that ended
    _staging/run_id=<id>/_run.json               what the run is (inputs, model_id): for resume
    _staging/run_id=<id>/part-<aa>-<nnnnnn>.parquet   parts, staged while the run works
    _staging/run_id=<id>/_manifest.json          the commit record: once every part is staged
    run_id=<id>/part-….parquet                   published parts
    run_id=<id>/_keys.npz                        their skip-set keys (core.skipset): what later runs skip
    run_id=<id>/_manifest.json                   the run manifest

Why: pyarrow, pandas, DuckDB's globs over `run_id=*` and Spark skip `_`-prefixed paths, so
reading the folder never shows an unfinished run; part names are deterministic (attempt +
sequence), so a retried write replaces its own file instead of adding a duplicate; a crashed
run leaves its staged parts and a rerun resumes from them.

Commit = write the staged `_manifest.json` (the decision), then publish:
- local: one rename of the whole staging directory, manifest inside: a run's rows and its
  manifest appear together, atomically.
- S3 (no multi-object atomicity): copy the parts, then the manifest, then delete the staging
  prefix. A reader listing the prefix during those seconds may see some of the run's parts;
  a kill there is rolled forward by the next run (`recover`), which publishes the same files.
Every step is idempotent, so a kill at any point and a rerun never duplicate a row.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import json
import logging
import os
import posixpath
import re
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from core import schema
from core.errors import BreedlabelError, ServiceError, StorageError
from core.skipset import KeyLog, SkipSet, contains_all, content_key
from core.storage import S3Options, get_filesystem

STAGING_DIR = "_staging"
RUN_FILE = "_run.json"
MANIFEST_FILE = "_manifest.json"
KEYS_FILE = "_keys.npz"            # the run's skip-set keys (core.skipset), published with it
LAST_RUN_FILE = "_last_run.json"   # the manifest of the newest run that ended, empty runs included
PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"
PARQUET_COMPRESSION = "zstd"

# run manifest keys (the manifest is the truth for exit codes)
M_RUN_ID = "run_id"
M_STATUS = "status"
M_MODEL_ID = "model_id"
M_RUNTIME = "runtime"
M_INPUTS = "inputs"
M_IMAGES = "images"            # rows written by this run (= input objects labelled or failed)
M_LABELLED = "labelled"
M_ERRORS = "errors"
M_ERRORS_BY_KIND = "errors_by_kind"
M_SKIPPED = "skipped"          # already labelled in a finished run (--incremental)
M_RESUMED = "resumed_rows"     # rows staged by an earlier, crashed attempt of this run
M_STILL_UNREADABLE = "still_unreadable"  # {reason: n}: read again, failed as in an earlier run (no second row)
M_LOW_CONFIDENCE = "low_confidence"
M_NOT_DOGS = "not_dogs"  # rows with is_dog false; null for a bundle without a dog score
M_BREEDS = "breeds"           # labelled images per top-1 breed, most frequent first (all of them)
M_IMG_PER_S = "img_per_s"
M_WALL_S = "wall_s"
M_STARTED_AT = "started_at"
M_FINISHED_AT = "finished_at"
M_ERROR_RATE = "error_rate"
M_MAX_ERROR_RATE = "max_error_rate"
M_EXIT_CODE = "exit_code"
M_FILES = "output_files"       # relative to the output URI
M_KEYS = "keys_file"           # relative to the output URI
M_STARTUP_S = "startup_s"      # from the run's start to its first labelled rows (Ray, actors, model load)
M_ATTEMPTS = "attempts"
M_CONFIG = "config"
M_RUNTIMES = "runtimes"         # what the actors really ran: {"openvino/f32": rows, ...}
STATUS_COMPLETE = "complete"

_READ_THREADS = 16  # concurrent small reads (manifests, key files) on S3

log = logging.getLogger(__name__)


def new_run_id() -> str:
    """Sortable by start time, unique without coordination."""
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{now}-{secrets.token_hex(3)}"


def run_dir(run_id: str) -> str:
    return f"{schema.PARTITION_KEY}={run_id}"


def part_name(attempt: int, seq: int) -> str:
    return f"{PART_PREFIX}{attempt:02d}-{seq:06d}{PART_SUFFIX}"


def _io_errors(method):
    """OS errors (pyarrow's included) of an output operation become errors naming the output:
    ServiceError when S3 does not answer (the run fails and resumes later), else StorageError."""
    @functools.wraps(method)
    def wrapper(self: "Output", *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except BreedlabelError:
            raise
        except OSError as exc:
            raise _named_os_error(self, exc, method.__name__.strip("_").replace("_", " ")) from None
    return wrapper


def _named_os_error(out: "Output", exc: OSError, what: str) -> BreedlabelError:
    if not out.local and any(m in str(exc) for m in _NETWORK_MARKS):
        return ServiceError(f"{out.uri}: {out.s3.endpoint} does not answer ({what}: {_aws_sdk_reason(str(exc))}); "
                            f"{out.s3.endpoint_check}, then rerun")
    return StorageError(f"{out.uri}: cannot {what}: {str(exc).splitlines()[0] if str(exc) else exc!r}; "
                        "check the output URI and its permissions")


def _aws_sdk_reason(message: str) -> str:
    """The gist of an AWS C++ SDK error as pyarrow words it ("When listing objects under key … AWS
    Error NETWORK_CONNECTION during ListObjectsV2 operation: curlCode: 7, Could not connect to
    server; Details: …"): "NETWORK_CONNECTION during ListObjectsV2: Could not connect to server"."""
    first = message.splitlines()[0] if message else ""
    error = re.search(r"AWS Error (\w+) during (\w+) operation", first)
    detail = re.search(r"curlCode: \d+, ([^;]+)", first)
    if error is None:
        return first
    return f"{error[1]} during {error[2]}" + (f": {detail[1].strip()}" if detail else "")


_NETWORK_MARKS = ("NETWORK_CONNECTION", "curlCode", "Timeout", "timed out", "Couldn't connect", "Connection refused",
                  "SERVICE_UNAVAILABLE", "INTERNAL_FAILURE", "SLOW_DOWN", "THROTTLING")


class Output:
    """One output URI: staging, commit/publish, recovery, and reading finished runs."""

    def __init__(self, uri: str, s3: S3Options | None = None):
        self.uri = uri.rstrip("/") if uri != "/" else uri
        self.s3 = (s3 or S3Options()).resolved()
        self.fs, self.root = get_filesystem(self.uri, s3=self.s3)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    # -- paths
    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def staging(self, run_id: str, *parts: str) -> str:
        return self.path(STAGING_DIR, run_dir(run_id), *parts)

    def published(self, run_id: str, *parts: str) -> str:
        return self.path(run_dir(run_id), *parts)

    # -- small JSON files
    @_io_errors
    def write_json(self, path: str, obj: Any) -> None:
        data = json.dumps(obj, indent=2, sort_keys=True, default=str).encode()
        self._write_atomic(path, lambda f: f.write(data))

    def read_json(self, path: str) -> dict | None:
        try:
            with self.fs.open_input_stream(path) as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise StorageError(f"{path}: cannot read run metadata ({exc}); remove it if it is damaged") from exc
        except OSError as exc:  # S3 not answering is not a damaged file
            raise _named_os_error(self, exc, "read run metadata") from None

    def _write_atomic(self, path: str, write) -> None:
        """Local: temp file + rename (a reader never sees half a file). S3: PUT is atomic."""
        parent = posixpath.dirname(path)
        target = posixpath.join(parent, f".{posixpath.basename(path)}.tmp") if self.local else path
        try:
            self.fs.create_dir(parent, recursive=True)
            with self.fs.open_output_stream(target) as f:
                write(f)
            if self.local:
                self.fs.move(target, path)
        except OSError as exc:  # S3 not answering is not a wrong URI or a permission
            raise _named_os_error(self, exc, f"write {path}") from exc

    @_io_errors
    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    # -- parts
    @_io_errors
    def write_part(self, run_id: str, name: str, table: pa.Table) -> str:
        """Write one staged part; the same name again replaces it (a retried write, no duplicate)."""
        path = self.staging(run_id, name)
        table = table.select(schema.FILE_SCHEMA.names).cast(schema.FILE_SCHEMA)
        self._write_atomic(path, lambda f: pq.write_table(table, f, compression=PARQUET_COMPRESSION))
        return path

    def _ls(self, path: str) -> list[pafs.FileInfo]:
        try:
            return self.fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        except OSError as exc:
            raise _named_os_error(self, exc, f"list {path}") from exc

    @_io_errors
    def staged_parts(self, run_id: str) -> list[str]:
        return sorted(i.path for i in self._ls(self.staging(run_id)) if _is_part(i))

    @_io_errors
    def staged_runs(self) -> list[str]:
        return _run_ids(self._ls(self.path(STAGING_DIR)))

    @_io_errors
    def published_runs(self) -> list[str]:
        return _run_ids(self._ls(self.root))

    @_io_errors
    def foreign_entries(self) -> list[str]:
        """Top-level names no label run writes (a run's are `run_id=…`, and `_`/`.` names, which
        readers skip): pandas, pyarrow and DuckDB reading the folder fail on the others."""
        names = (posixpath.basename(i.path.rstrip("/")) for i in self._ls(self.root))
        return sorted(n for n in names if n and not n.startswith(("_", ".", run_dir(""))))

    def check_is_ours(self) -> None:
        """Refuse an output folder that holds other files: its rows could not be read back as a whole."""
        foreign = self.foreign_entries()
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            what = "1 entry" if len(foreign) == 1 else f"{len(foreign)} entries"
            raise StorageError(f"{self.uri}: the output folder holds {what} no label run wrote ({shown}), on which "
                               "readers of the folder (pandas, pyarrow, DuckDB) fail; give a new or empty folder, or "
                               "move them out")

    # -- commit
    @_io_errors
    def commit(self, run_id: str, manifest: dict, keys: SkipSet | None = None,
               parts: Sequence[str] | None = None) -> dict:
        """Record the decision (the staged manifest), then publish; returns the manifest written.

        `parts` are the staged parts this run counted (read back from earlier attempts, and its
        own); any other part in its staging was written by an attempt that lost the lease while
        stalled, after this one took over and read back: its rows are this run's too, so it is
        deleted, not published. Without `parts`, every staged part is published.

        A run that wrote no row and learned no key publishes nothing but `_last_run.json`: an
        hourly no-op run over an unchanged bucket leaves no folder behind. (A run that only read
        objects whose new version holds labelled content publishes their keys, so the next run
        does not read them again.)
        """
        staged = self.staged_parts(run_id)
        if parts is not None:  # by name: a listing and a writer may spell the folder differently
            ours = {posixpath.basename(p) for p in parts}
            strays = [p for p in staged if posixpath.basename(p) not in ours]
            if strays:
                log.warning("%s: run %s: discarding %d staged part(s) written after another attempt took the "
                            "run over (%s); their inputs are in this run's own rows", self.uri, run_id,
                            len(strays), ", ".join(posixpath.basename(p) for p in strays))
                for path in strays:
                    self.fs.delete_file(path)
            staged = [p for p in staged if posixpath.basename(p) in ours]
        parts = staged
        manifest = {**manifest, M_FILES: [posixpath.join(run_dir(run_id), posixpath.basename(p)) for p in parts]}
        if not parts and (keys is None or not len(keys.listing)):
            self.write_json(self.path(LAST_RUN_FILE), manifest)
            self.discard_staged(run_id)
            return manifest
        if keys is not None:
            self._write_atomic(self.staging(run_id, KEYS_FILE),
                               lambda f: np.savez(f, content=keys.content, listing=keys.listing))
            manifest[M_KEYS] = posixpath.join(run_dir(run_id), KEYS_FILE)
        self.write_json(self.staging(run_id, MANIFEST_FILE), manifest)
        self._publish(run_id)
        self.write_json(self.path(LAST_RUN_FILE), manifest)
        self._drop_empty_staging()
        return manifest

    def _drop_empty_staging(self) -> None:
        """A local output keeps no empty `_staging/` folder once its runs are published (S3 has no
        folders); one still holding a stopped run's parts stays."""
        if self.local:
            with contextlib.suppress(OSError):
                os.rmdir(self.path(STAGING_DIR))

    @_io_errors
    def _publish(self, run_id: str) -> None:
        """Idempotent: from a staged manifest to a published run, whatever was done before a kill."""
        src, dst = self.staging(run_id), self.published(run_id)
        if self.local:
            if self.exists(posixpath.join(dst, MANIFEST_FILE)):  # published already: staging is debris
                log.warning("%s: run %s was already published; removing its leftover staging", self.uri, run_id)
                self.fs.delete_dir(src)
                return
            self.fs.create_dir(self.root, recursive=True)
            self.fs.move(src, dst)  # one atomic rename: parts and manifest appear together
            return
        manifest = self.read_json(posixpath.join(src, MANIFEST_FILE))
        if manifest is None:
            raise StorageError(f"{self.uri}: run {run_id} has no staged {MANIFEST_FILE}; it cannot be published")
        for rel in [*manifest.get(M_FILES, []), *([manifest[M_KEYS]] if manifest.get(M_KEYS) else [])]:
            self.fs.copy_file(posixpath.join(src, posixpath.basename(rel)), self.path(rel))
        self.write_json(self.published(run_id, MANIFEST_FILE), manifest)
        self.fs.delete_dir(src)

    @_io_errors
    def recover(self) -> list[str]:
        """Roll forward every publish that a kill interrupted after its commit; returns their run ids."""
        done = []
        for run_id in self.staged_runs():
            if self.exists(self.staging(run_id, MANIFEST_FILE)):
                self._publish(run_id)
                done.append(run_id)
        return done

    @_io_errors
    def discard_staged(self, run_id: str) -> None:
        if self.exists(self.staging(run_id)):
            self.fs.delete_dir(self.staging(run_id))
        self._drop_empty_staging()

    # -- finished runs
    @_io_errors
    def finished_runs(self) -> list[dict]:
        """Manifests of the runs that finished, oldest first (read in parallel: S3 latency)."""
        paths = [self.published(run_id, MANIFEST_FILE) for run_id in self.published_runs()]
        with ThreadPoolExecutor(_READ_THREADS) as pool:
            manifests = list(pool.map(self.read_json, paths))
        return sorted((m for m in manifests if m is not None and m.get(M_STATUS) == STATUS_COMPLETE),
                      key=lambda m: m[M_RUN_ID])

    @_io_errors
    def last_run(self) -> dict | None:
        """The manifest of the newest run that ended, including a run that had nothing to label."""
        return self.read_json(self.path(LAST_RUN_FILE))

    @_io_errors
    def read_finished(self, columns: Sequence[str] | None = None) -> pa.Table:
        """Rows of finished runs only (LABEL_SCHEMA, `run_id` included), exactly the files their manifests list."""
        names = list(columns) if columns else schema.LABEL_SCHEMA.names
        tables = [schema.with_run_id(pq.read_table(self.path(f), filesystem=self.fs), m[M_RUN_ID]).select(names)
                  for m in self.finished_runs() for f in m.get(M_FILES, [])]
        if not tables:
            return pa.schema([schema.LABEL_SCHEMA.field(c) for c in names]).empty_table()
        return pa.concat_tables(tables, promote_options="default")

    @_io_errors
    def done_keys(self, model_id: str) -> SkipSet:
        """The keys of every row finished runs hold for `model_id`: their `_keys.npz` files, read in
        parallel (outputs written before those files existed: computed from their parts)."""
        runs = [m for m in self.finished_runs() if m.get(M_MODEL_ID) == model_id]
        with ThreadPoolExecutor(_READ_THREADS) as pool:
            return SkipSet.union(pool.map(self._run_keys, runs))

    def _run_keys(self, manifest: dict) -> SkipSet:
        if manifest.get(M_KEYS):
            with self.fs.open_input_file(self.path(manifest[M_KEYS])) as f:
                keys = np.load(f, allow_pickle=False)
                return SkipSet(keys["content"], keys["listing"])
        return self.parts_keys([self.path(f) for f in manifest.get(M_FILES, [])])

    @_io_errors
    def parts_keys(self, files: Sequence[str], *, archives: bool = True) -> SkipSet:
        """Keys of the rows in these part files (a resumed run's staged parts: `archives=False`)."""
        log = KeyLog()
        for f in files:
            names = pq.read_schema(f, filesystem=self.fs).names
            columns = [c for c in (*schema.KEY_COLUMNS, schema.VERSION) if c in names]
            log.add_rows(pq.read_table(f, filesystem=self.fs, columns=columns), archives=archives)
        return log.skipset()

    @_io_errors
    def drop_rows_in(self, part: str, keys: np.ndarray) -> int:
        """Rewrite a staged part without the rows whose key is in `keys`; returns how many went.

        For a resumed run whose staged rows a run finished since (while it was dead) already
        published: without this, its commit would publish a second row for those keys.
        """
        table = pq.read_table(part, filesystem=self.fs)
        cols = [table.column(c).to_pylist() for c in schema.KEY_COLUMNS]
        keep = ~contains_all(keys, np.fromiter((content_key(*row) for row in zip(*cols)), np.uint64,
                                               count=table.num_rows))
        if keep.all():
            return 0
        if keep.any():
            self._write_atomic(part, lambda f: pq.write_table(table.filter(pa.array(keep)), f,
                                                               compression=PARQUET_COMPRESSION))
        else:
            self.fs.delete_file(part)
        return int((~keep).sum())


def _is_part(info: pafs.FileInfo) -> bool:
    name = posixpath.basename(info.path)
    return info.type == pafs.FileType.File and name.startswith(PART_PREFIX) and name.endswith(PART_SUFFIX)


def _run_ids(infos: Iterable[pafs.FileInfo]) -> list[str]:
    prefix = f"{schema.PARTITION_KEY}="
    return sorted(posixpath.basename(i.path)[len(prefix):] for i in infos
                  if i.type == pafs.FileType.Directory and posixpath.basename(i.path).startswith(prefix))


@dataclass
class PartWriter:
    """Buffers label rows and stages a part every `rows_per_file` rows or `every_s` seconds.

    Why both: parts of `rows_per_file` rows keep the file count sane for readers, and the time
    bound is what a kill can lose (a 10-hour run loses at most the last `every_s` seconds).
    """

    output: Output
    run_id: str
    attempt: int
    rows_per_file: int
    every_s: float = 30.0
    clock: Callable[[], float] = time.monotonic
    files: list[str] = field(default_factory=list)
    rows: int = 0
    _buffer: list[pa.Table] = field(default_factory=list)
    _buffered: int = 0
    _last: float | None = None

    def add(self, table: pa.Table) -> None:
        if self._last is None:
            self._last = self.clock()
        if table.num_rows:
            self._buffer.append(table)
            self._buffered += table.num_rows
        if self._buffered >= self.rows_per_file:
            self.flush(final=False)
        elif self._buffered and self.clock() - self._last >= self.every_s:
            self.flush()

    @property
    def buffered(self) -> int:
        """Rows received and not yet staged."""
        return self._buffered

    def flush(self, final: bool = True) -> None:
        """Write full parts of `rows_per_file` rows; with `final`, the remainder too."""
        self._last = self.clock()
        if not self._buffer:
            return
        table = pa.concat_tables(self._buffer)
        self._buffer, self._buffered = [], 0
        while table.num_rows >= self.rows_per_file or (final and table.num_rows):
            self._write(table.slice(0, self.rows_per_file).combine_chunks())
            table = table.slice(self.rows_per_file)
        if table.num_rows:
            self._buffer, self._buffered = [table], table.num_rows

    def _write(self, table: pa.Table) -> None:
        name = part_name(self.attempt, len(self.files))
        self.files.append(self.output.write_part(self.run_id, name, table))
        self.rows += table.num_rows
