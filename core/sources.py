"""Expand what a user points at (folders, prefixes, files, archives, manifests) into a stream of items.

    items = iter_items(["s3://photos/2024/", "uploads/batch.tar.gz"], manifest=None)

yields `InputItem(uri, member, size, error)` one by one, in a deterministic order (sorted
within each input, archive members in archive order), so a labelling run's parts are
reproducible. Nothing is extracted to disk, and a corrupt or unreadable archive yields ONE
item whose `error` is set instead of raising: per-image problems become rows, not crashes.

Reading bytes, and the intended use by the label job
----------------------------------------------------
* Plain objects: `read_item(item)` (random access; a vanished object raises
  `ObjectNotFoundError`, whose `.reason` "not found" goes into the row's `error`).
* Archives: a tar (and any gzip stream) can only be read front to back, so reading members
  one by one with `read_item` would re-read the archive each time. `iter_label_items` (what
  the label job lists) reads each archive ONCE with `iter_archive_members` (tar: one sequential
  GET; zip: central directory + buffered range reads) and hands on its members' bytes, as
  `ItemData(item, data, error)`: `data` is None for plain objects (the actors read them) and
  whenever `error` is set.
"""
from __future__ import annotations

import csv
import io
import os
import posixpath
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, replace
from itertools import chain
from typing import Iterable, Iterator, NamedTuple, Sequence

from core import storage
from core.errors import InputError, StorageError
from core.reasons import (REASON_CORRUPT_ARCHIVE, REASON_MEMBER_NOT_FOUND, REASON_MEMBER_TOO_LARGE,
                          REASON_NOT_FOUND)
from core.storage import IMAGE_EXTENSIONS, ObjectNotFoundError, S3Options

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
ZIP_SUFFIXES = (".zip",)
ARCHIVE_SUFFIXES = TAR_SUFFIXES + ZIP_SUFFIXES
MANIFEST_SUFFIXES = (".txt", ".csv", ".parquet")
MANIFEST_URI = "uri"  # manifest column names (csv header / parquet schema)
MANIFEST_MEMBER = "member"
MAX_MEMBER_BYTES = 512 << 20  # larger archive members are an error row, not an allocation
_ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError)


@dataclass(frozen=True)
class InputItem:
    uri: str
    member: str | None = None
    size: int | None = None
    error: str | None = None

    @property
    def is_archive(self) -> bool:
        """A whole, unexpanded archive (see `iter_archive_members`)."""
        return self.member is None and self.error is None and is_archive_uri(self.uri)


class ItemData(NamedTuple):
    item: InputItem
    data: bytes | None
    error: str | None


def is_archive_uri(uri: str) -> bool:
    return uri.lower().endswith(ARCHIVE_SUFFIXES)


def _is_zip(uri: str) -> bool:
    return uri.lower().endswith(ZIP_SUFFIXES)


def _wanted_member(name: str, extensions: Iterable[str] | None) -> bool:
    """Image members only; macOS resource forks (`__MACOSX/`, `._x.jpg`) are not images."""
    base = posixpath.basename(name)
    if name.startswith("__MACOSX/") or "/__MACOSX/" in name or base.startswith("._"):
        return False
    return storage.matches_extensions(name, extensions)


# --- listing -------------------------------------------------------------------------------

def iter_items(inputs: Sequence[str], *, extensions: Iterable[str] | None = IMAGE_EXTENSIONS,
               manifest: str | None = None, expand_archives: bool = True,
               s3: S3Options | None = None) -> Iterator[InputItem]:
    """Stream the items of every input, in input order; an input with no images is an InputError."""
    exts = tuple(extensions) if extensions is not None else None
    if not inputs and manifest is None:
        raise InputError("no inputs given; pass folders, files, archives or s3:// prefixes, or --manifest")
    for raw in inputs:
        yield from _expand(storage.normalize_uri(raw), exts, expand_archives, s3)
    if manifest is not None:
        yield from _iter_manifest(manifest, exts, expand_archives, s3)


def _expand(uri: str, exts: tuple[str, ...] | None, expand_archives: bool,
            s3: S3Options | None) -> Iterator[InputItem]:
    if is_archive_uri(uri):
        try:
            size = storage.stat(uri, s3=s3).size
        except ObjectNotFoundError:
            raise InputError(f"{uri}: archive not found; check the path") from None
        yield from _archive_items(uri, size, exts, expand_archives, s3)
        return
    if storage.parse_uri(uri).scheme == "file" and os.path.isfile(uri):
        yield InputItem(uri, size=os.path.getsize(uri))
        return
    if storage.is_s3(uri) and not uri.endswith("/") and storage.parse_uri(uri).path:
        try:
            yield InputItem(uri, size=storage.stat(uri, s3=s3).size)
            return
        except ObjectNotFoundError:
            pass  # not an object: a prefix
    yield from _expand_listing(uri, exts, expand_archives, s3)


def _expand_listing(uri: str, exts: tuple[str, ...] | None, expand_archives: bool,
                    s3: S3Options | None) -> Iterator[InputItem]:
    """A folder/prefix: its images and the archives found there (members, or whole when not expanding)."""
    found = 0
    listed = None if exts is None else exts + ARCHIVE_SUFFIXES
    for info in storage.list_files(uri, extensions=listed, s3=s3):
        found += 1
        if is_archive_uri(info.uri):
            yield from _archive_items(info.uri, info.size, exts, expand_archives, s3)
        else:
            yield InputItem(info.uri, size=info.size)
    if not found:
        what = "files" if exts is None else f"images ({', '.join(exts)})"
        raise InputError(f"{uri}: no {what} found; check the path or prefix (listing is recursive)")


def _archive_items(uri: str, size: int, exts: tuple[str, ...] | None, expand: bool,
                   s3: S3Options | None) -> Iterator[InputItem]:
    if not expand:
        yield InputItem(uri, size=size)
        return
    try:
        if _is_zip(uri):
            with storage.open_input(uri, s3=s3) as f, zipfile.ZipFile(f) as zf:
                for info in _zip_members(zf, exts):
                    yield InputItem(uri, info.filename, info.file_size)
        else:
            with storage.open_stream(uri, s3=s3) as f, tarfile.open(fileobj=f, mode="r|*") as tf:
                for info in tf:
                    if info.isfile() and _wanted_member(info.name, exts):
                        yield InputItem(uri, info.name, info.size)
    except ObjectNotFoundError:
        yield InputItem(uri, error=REASON_NOT_FOUND)
    except StorageError:
        raise
    except _ARCHIVE_ERRORS as exc:
        yield InputItem(uri, error=_archive_reason(exc))


def _archive_reason(exc: BaseException) -> str:
    return f"{REASON_CORRUPT_ARCHIVE}: {type(exc).__name__}"


def _zip_members(zf: zipfile.ZipFile, exts: tuple[str, ...] | None) -> list[zipfile.ZipInfo]:
    """Image members in archive (offset) order, so reading them is sequential."""
    infos = [i for i in zf.infolist() if not i.is_dir() and _wanted_member(i.filename, exts)]
    return sorted(infos, key=lambda i: i.header_offset)


def iter_label_items(inputs: Sequence[str], manifests: Sequence[str] = (), *,
                     extensions: Iterable[str] | None = IMAGE_EXTENSIONS,
                     s3: S3Options | None = None) -> Iterator[ItemData]:
    """Everything a label run labels, streamed in input order: plain objects without their bytes
    (the actors read them, in parallel), archive members with theirs (read here, once per archive)."""
    exts = tuple(extensions) if extensions is not None else None
    listings = [iter_items(inputs, extensions=exts, expand_archives=False, s3=s3)] if inputs else []
    listings += [iter_items([], manifest=m, extensions=exts, expand_archives=False, s3=s3) for m in manifests]
    for item in chain.from_iterable(listings):
        if item.is_archive:
            yield from iter_archive_members(item.uri, extensions=exts, s3=s3)
        else:
            yield ItemData(item, None, item.error)


# --- manifests -----------------------------------------------------------------------------

def _iter_manifest(uri: str, exts: tuple[str, ...] | None, expand_archives: bool,
                   s3: S3Options | None) -> Iterator[InputItem]:
    """Rows are taken as objects (no listing, no HEAD); archive rows without a member are expanded."""
    lower = uri.lower()
    if not lower.endswith(MANIFEST_SUFFIXES):
        raise InputError(f"{uri}: unknown manifest type; use .txt (one URI a line), .csv or .parquet "
                         f"(columns {MANIFEST_URI!r}, optional {MANIFEST_MEMBER!r})")
    try:
        rows = _manifest_rows(uri, lower, s3)
        base = storage.normalize_uri(uri)
        for row_uri, member in rows:
            target = _resolve(base, row_uri)
            if member is None and expand_archives and is_archive_uri(target):
                yield from _archive_items(target, 0, exts, True, s3)
            else:
                yield InputItem(target, member or None)
    except ObjectNotFoundError:
        raise InputError(f"{uri}: manifest not found; check the path") from None


def _manifest_rows(uri: str, lower: str, s3: S3Options | None) -> Iterator[tuple[str, str | None]]:
    if lower.endswith(".parquet"):
        yield from _parquet_rows(uri, s3)
        return
    text = storage.read_bytes(uri, s3=s3).decode("utf-8-sig")
    if lower.endswith(".txt"):
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                yield line, None
        return
    reader = csv.DictReader(io.StringIO(text))
    if MANIFEST_URI not in (reader.fieldnames or ()):
        raise InputError(f"{uri}: CSV manifest has no {MANIFEST_URI!r} column (header: {reader.fieldnames}); "
                         f"add a header row with {MANIFEST_URI!r} and optionally {MANIFEST_MEMBER!r}")
    for row in reader:
        if (row.get(MANIFEST_URI) or "").strip():
            yield row[MANIFEST_URI].strip(), (row.get(MANIFEST_MEMBER) or "").strip() or None


def _parquet_rows(uri: str, s3: S3Options | None) -> Iterator[tuple[str, str | None]]:
    """Streamed in record batches: a manifest of millions of rows never sits in memory whole."""
    import pyarrow.parquet as pq

    fs, path = storage.get_filesystem(uri, s3=s3)
    try:
        pf = pq.ParquetFile(fs.open_input_file(path))
    except FileNotFoundError:
        raise ObjectNotFoundError(uri) from None
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for bad files
        raise InputError(f"{uri}: cannot read Parquet manifest: {exc}") from None
    names = pf.schema_arrow.names
    if MANIFEST_URI not in names:
        raise InputError(f"{uri}: Parquet manifest has no {MANIFEST_URI!r} column (columns: {names})")
    columns = [MANIFEST_URI] + ([MANIFEST_MEMBER] if MANIFEST_MEMBER in names else [])
    for batch in pf.iter_batches(batch_size=10_000, columns=columns):
        uris = batch.column(0).to_pylist()
        members = batch.column(1).to_pylist() if len(columns) == 2 else [None] * len(uris)
        for u, m in zip(uris, members):
            if u:
                yield u, m


def _resolve(manifest_uri: str, row_uri: str) -> str:
    """Relative local paths in a manifest are relative to the manifest's folder."""
    if storage.is_s3(row_uri) or row_uri.startswith("file://") or os.path.isabs(row_uri):
        return storage.normalize_uri(row_uri)
    if storage.is_s3(manifest_uri):
        return storage.join(manifest_uri.rsplit("/", 1)[0], row_uri)
    return os.path.normpath(os.path.join(os.path.dirname(manifest_uri), row_uri))


# --- reading -----------------------------------------------------------------------------

def read_item(item: InputItem, *, s3: S3Options | None = None) -> bytes:
    """Bytes of one item. For many members of one archive use `iter_archive_members` instead.

    Raises ObjectNotFoundError (vanished object) or InputError (item error, missing/corrupt member).
    """
    if item.error:
        raise InputError(f"{item.uri}: {item.error}")
    if item.member is None:
        return storage.read_bytes(item.uri, s3=s3)
    for got in iter_archive_members(item.uri, extensions=None, members={item.member}, s3=s3):
        if got.error:
            raise InputError(f"{item.uri}[{item.member}]: {got.error}")
        return got.data  # type: ignore[return-value]
    raise InputError(f"{item.uri}[{item.member}]: {REASON_MEMBER_NOT_FOUND}")


def iter_archive_members(uri: str, *, extensions: Iterable[str] | None = IMAGE_EXTENSIONS,
                         members: set[str] | frozenset[str] | None = None,
                         s3: S3Options | None = None) -> Iterator[ItemData]:
    """Every image member of one archive with its bytes, reading the archive once.

    `members` restricts to those names (a requested name that is absent yields an error row;
    a tar stops reading once all are found). A corrupt archive yields the members read so
    far, then one item with `error` set; a vanished archive yields one "not found" item.
    """
    exts = tuple(extensions) if extensions is not None else None
    wanted = set(members) if members is not None else None
    reader = (_zip_data if _is_zip(uri) else _tar_data)(uri, exts, wanted, s3)
    try:
        for got in reader:
            if wanted is not None:
                wanted.discard(got.item.member)
            yield got
            if wanted is not None and not wanted:
                return
    except ObjectNotFoundError:
        yield ItemData(InputItem(uri, error=REASON_NOT_FOUND), None, REASON_NOT_FOUND)
        return
    except StorageError:
        raise
    except _ARCHIVE_ERRORS as exc:
        reason = _archive_reason(exc)
        yield ItemData(InputItem(uri, error=reason), None, reason)
        return
    finally:
        reader.close()  # releases the HTTP stream at once when stopping early
    for name in sorted(wanted or ()):
        yield ItemData(InputItem(uri, name, error=REASON_MEMBER_NOT_FOUND), None, REASON_MEMBER_NOT_FOUND)


def _member_ok(name: str, exts, wanted) -> bool:
    return (name in wanted) if wanted is not None else _wanted_member(name, exts)


def _too_large(uri: str, name: str, size: int) -> ItemData:
    return ItemData(InputItem(uri, name, size, REASON_MEMBER_TOO_LARGE), None, REASON_MEMBER_TOO_LARGE)


def _zip_data(uri: str, exts, wanted, s3) -> Iterator[ItemData]:
    with storage.open_input(uri, s3=s3) as f, zipfile.ZipFile(f) as zf:
        infos = [i for i in _zip_members(zf, None) if _member_ok(i.filename, exts, wanted)]
        for info in infos:
            item = InputItem(uri, info.filename, info.file_size)
            if info.file_size > MAX_MEMBER_BYTES:
                yield _too_large(uri, info.filename, info.file_size)
                continue
            try:
                data = zf.read(info)
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
                reason = _archive_reason(exc)
                yield ItemData(replace(item, error=reason), None, reason)
                continue
            yield ItemData(item, data, None)


def _tar_data(uri: str, exts, wanted, s3) -> Iterator[ItemData]:
    with storage.open_stream(uri, s3=s3) as f, tarfile.open(fileobj=f, mode="r|*") as tf:
        for info in tf:
            if not info.isfile() or not _member_ok(info.name, exts, wanted):
                continue
            if info.size > MAX_MEMBER_BYTES:
                yield _too_large(uri, info.name, info.size)
                continue
            item = InputItem(uri, info.name, info.size)
            try:
                data = tf.extractfile(info).read()  # type: ignore[union-attr]
            except _ARCHIVE_ERRORS as exc:  # truncated mid-member: this row, then the archive's
                reason = _archive_reason(exc)
                yield ItemData(replace(item, error=reason), None, reason)
                raise
            yield ItemData(item, data, None)
