"""Where a labelling run's Parquet goes, and how a run becomes visible only when it is whole.

Layout under the output URI (local path or s3://):

    _staging/run_id=<id>/_run.json               what the run is (inputs, model_id): for resume
    _staging/run_id=<id>/part-<aa>-<nnnnnn>.parquet   parts while the run works
    _staging/run_id=<id>/_commit.json            the manifest, once every part is staged
    run_id=<id>/part-….parquet                   published parts
    run_id=<id>/_manifest.json                   the run manifest, written LAST

Why: pyarrow, pandas and Spark skip `_`-prefixed paths, so reading the folder as a dataset
never shows a run that did not finish; part names are deterministic (attempt + sequence), so
a retried write replaces its own file instead of adding a duplicate; a crashed run leaves its
staged parts, and a rerun with the same inputs and model resumes from them. Publishing is one
directory rename locally (atomic); on S3 it is copy + delete per part, and `_commit.json`
lets the next run roll an interrupted publish forward. Readers that must be exact on S3 use
`finished_runs` (or join on the manifests, see README).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import posixpath
import secrets
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from core import schema
from core.errors import StorageError

STAGING_DIR = "_staging"
RUN_FILE = "_run.json"
COMMIT_FILE = "_commit.json"
MANIFEST_FILE = "_manifest.json"
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
M_LOW_CONFIDENCE = "low_confidence"
M_TOP_BREEDS = "top_breeds"
M_IMG_PER_S = "img_per_s"
M_WALL_S = "wall_s"
M_STARTED_AT = "started_at"
M_FINISHED_AT = "finished_at"
M_ERROR_RATE = "error_rate"
M_MAX_ERROR_RATE = "max_error_rate"
M_EXIT_CODE = "exit_code"
M_FILES = "output_files"       # relative to the output URI
M_ATTEMPTS = "attempts"
M_CONFIG = "config"
STATUS_COMPLETE = "complete"


def new_run_id() -> str:
    """Sortable by start time, unique without coordination."""
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{now}-{secrets.token_hex(3)}"


def run_dir(run_id: str) -> str:
    return f"{schema.PARTITION_KEY}={run_id}"


def part_name(attempt: int, seq: int) -> str:
    return f"{PART_PREFIX}{attempt:02d}-{seq:06d}{PART_SUFFIX}"


def key_hash(uri: str, member: str | None, sha256: str, model_id: str) -> int:
    """64-bit key of (uri, member, content_sha256, model_id) for the incremental skip-set.

    Why 64 bits: the set stays a flat sorted uint64 array (8 bytes an image) that Ray can hand
    to every actor zero-copy; a false match needs a collision (~1e-7 at a million images).
    """
    text = "\0".join((uri, member or "", sha256, model_id)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def key_set(hashes: Iterable[int]) -> np.ndarray:
    return np.unique(np.fromiter(hashes, dtype=np.uint64))


def in_key_set(keys: np.ndarray, value: int) -> bool:
    if len(keys) == 0:
        return False
    i = int(np.searchsorted(keys, np.uint64(value)))
    return i < len(keys) and int(keys[i]) == value


class Output:
    """One output URI: staging, publishing, manifests, and reading finished runs."""

    def __init__(self, uri: str):
        from core.storage import get_filesystem

        self.uri = uri.rstrip("/") if uri != "/" else uri
        self.fs, self.root = get_filesystem(self.uri)

    # -- paths
    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def staging(self, run_id: str, *parts: str) -> str:
        return self.path(STAGING_DIR, run_dir(run_id), *parts)

    def published(self, run_id: str, *parts: str) -> str:
        return self.path(run_dir(run_id), *parts)

    # -- small JSON files
    def write_json(self, path: str, obj: Any) -> None:
        data = json.dumps(obj, indent=2, sort_keys=True, default=str).encode()
        self._write_atomic(path, lambda f: f.write(data))

    def read_json(self, path: str) -> dict | None:
        try:
            with self.fs.open_input_stream(path) as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise StorageError(f"{path}: cannot read run metadata ({exc}); remove it if it is damaged") from exc

    def _write_atomic(self, path: str, write) -> None:
        """Local: temp file + rename (a reader never sees half a file). S3: PUT is atomic."""
        parent = posixpath.dirname(path)
        self.fs.create_dir(parent, recursive=True)
        local = isinstance(self.fs, pafs.LocalFileSystem)
        target = posixpath.join(parent, f".{posixpath.basename(path)}.tmp") if local else path
        try:
            with self.fs.open_output_stream(target) as f:
                write(f)
            if local:
                self.fs.move(target, path)
        except OSError as exc:
            raise StorageError(f"{self.uri}: cannot write {path}: {exc}; check the output URI and permissions") from exc

    # -- parts
    def write_part(self, run_id: str, name: str, table: pa.Table) -> str:
        """Write one staged part; the same name again replaces it (a retried write, no duplicate)."""
        path = self.staging(run_id, name)
        self._write_atomic(path, lambda f: pq.write_table(table, f, compression=PARQUET_COMPRESSION))
        return path

    def _ls(self, path: str) -> list[pafs.FileInfo]:
        try:
            return self.fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        except OSError as exc:
            raise StorageError(f"{self.uri}: cannot list {path}: {exc}") from exc

    def staged_parts(self, run_id: str) -> list[str]:
        return sorted(i.path for i in self._ls(self.staging(run_id)) if _is_part(i))

    def staged_runs(self) -> list[str]:
        prefix = f"{schema.PARTITION_KEY}="
        return sorted(posixpath.basename(i.path)[len(prefix):] for i in self._ls(self.path(STAGING_DIR))
                      if i.type == pafs.FileType.Directory and posixpath.basename(i.path).startswith(prefix))

    # -- commit
    def commit(self, run_id: str, manifest: dict) -> None:
        """Publish every staged part of `run_id`, then write its manifest (last)."""
        parts = self.staged_parts(run_id)
        manifest = {**manifest, M_FILES: [posixpath.join(run_dir(run_id), posixpath.basename(p)) for p in parts]}
        self.write_json(self.staging(run_id, COMMIT_FILE), manifest)
        self._publish(run_id)

    def _publish(self, run_id: str) -> None:
        src, dst = self.staging(run_id), self.published(run_id)
        commit = self.read_json(posixpath.join(src, COMMIT_FILE))
        if commit is None:  # already moved (local rename) or never committed
            commit = self.read_json(posixpath.join(dst, COMMIT_FILE))
        if commit is None:
            raise StorageError(f"{self.uri}: run {run_id} has no {COMMIT_FILE}; it cannot be published")
        if isinstance(self.fs, pafs.LocalFileSystem):
            if self.fs.get_file_info(src).type == pafs.FileType.Directory:
                self.fs.create_dir(self.root, recursive=True)
                self.fs.move(src, dst)  # one atomic directory rename
        else:
            for info in self._ls(src):
                if info.type == pafs.FileType.File:
                    self.fs.copy_file(info.path, posixpath.join(dst, posixpath.basename(info.path)))
        self.write_json(self.published(run_id, MANIFEST_FILE), commit)
        if not isinstance(self.fs, pafs.LocalFileSystem):
            self.fs.delete_dir(src)

    def recover(self) -> list[str]:
        """Roll forward publishes that a crash interrupted after commit; returns their run ids."""
        done: list[str] = []
        for run_id in self.staged_runs():
            if self.read_json(self.staging(run_id, COMMIT_FILE)) is not None:
                self._publish(run_id)
                done.append(run_id)
        for info in self._ls(self.root):
            name = posixpath.basename(info.path)
            if info.type == pafs.FileType.Directory and name.startswith(f"{schema.PARTITION_KEY}="):
                if self.fs.get_file_info(posixpath.join(info.path, MANIFEST_FILE)).type == pafs.FileType.NotFound \
                        and self.fs.get_file_info(posixpath.join(info.path, COMMIT_FILE)).type == pafs.FileType.File:
                    run_id = name.split("=", 1)[1]
                    self._publish(run_id)
                    done.append(run_id)
        return done

    # -- finished runs
    def finished_runs(self) -> list[dict]:
        """Manifests of the runs that finished, oldest first."""
        out = []
        for info in self._ls(self.root):
            name = posixpath.basename(info.path)
            if info.type == pafs.FileType.Directory and name.startswith(f"{schema.PARTITION_KEY}="):
                manifest = self.read_json(posixpath.join(info.path, MANIFEST_FILE))
                if manifest is not None and manifest.get(M_STATUS) == STATUS_COMPLETE:
                    out.append(manifest)
        return sorted(out, key=lambda m: m[M_RUN_ID])

    def read_finished(self, columns: Sequence[str] | None = None) -> pa.Table:
        """Rows of finished runs only, exactly the files their manifests list."""
        files = [self.path(f) for m in self.finished_runs() for f in m.get(M_FILES, [])]
        return self._read_files(files, columns)

    def _read_files(self, files: Sequence[str], columns: Sequence[str] | None) -> pa.Table:
        tables = [pq.read_table(f, filesystem=self.fs, columns=list(columns) if columns else None)
                  for f in files]
        if not tables:
            names = list(columns) if columns else schema.LABEL_SCHEMA.names
            return pa.schema([schema.LABEL_SCHEMA.field(c) for c in names]).empty_table()
        return pa.concat_tables(tables, promote_options="default")

    def iter_keys(self, files: Sequence[str], model_id: str | None = None) -> Iterator[int]:
        """key_hash of each row in `files` (optionally only rows of `model_id`), file by file."""
        for f in files:
            t = pq.read_table(f, filesystem=self.fs, columns=list(schema.KEY_COLUMNS))
            cols = [t.column(c).to_pylist() for c in schema.KEY_COLUMNS]
            for uri, member, sha, mid in zip(*cols):
                if model_id is None or mid == model_id:
                    yield key_hash(uri, member, sha, mid)

    def done_keys(self, model_id: str, extra_files: Sequence[str] = ()) -> np.ndarray:
        """Sorted uint64 key-set of rows already labelled with `model_id` in finished runs (+ extra)."""
        files = [self.path(f) for m in self.finished_runs() if m.get(M_MODEL_ID) == model_id
                 for f in m.get(M_FILES, [])]
        return key_set(self.iter_keys([*files, *extra_files], model_id))


def _is_part(info: pafs.FileInfo) -> bool:
    name = posixpath.basename(info.path)
    return info.type == pafs.FileType.File and name.startswith(PART_PREFIX) and name.endswith(PART_SUFFIX)


@dataclass
class PartWriter:
    """Buffers label tables and writes a staged part every `rows_per_file` rows."""

    output: Output
    run_id: str
    attempt: int
    rows_per_file: int
    files: list[str] = field(default_factory=list)
    rows: int = 0
    _buffer: list[pa.Table] = field(default_factory=list)
    _buffered: int = 0

    def add(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self._buffer.append(table)
        self._buffered += table.num_rows
        if self._buffered >= self.rows_per_file:
            self.flush(final=False)

    def flush(self, final: bool = True) -> None:
        """Write full parts of `rows_per_file` rows; with `final`, the remainder too."""
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
