"""Expand what a user points at (folders, prefixes, files, archives, manifests) into a stream of items.

    items = iter_label_items(["s3://photos/2024/", "uploads/batch.tar.gz"], ["more.txt"])

yields `ItemData(InputItem(uri, member, size, error, version), data, error)` one by one, in a
deterministic order (sorted within each input, archive members in archive order), so a
labelling run's parts are reproducible. Every object that looks like an image gets exactly
one item (rows out = objects in): a corrupt, unreadable, too large, linked or nested one gets
an item whose `error` is set instead of raising. Nothing is extracted to disk.

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
import hashlib
import io
import lzma
import os
import posixpath
import re
import stat
import sys
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, replace
from itertools import chain, islice
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence
from urllib.parse import quote

import pyarrow as pa
import pyarrow.parquet as pq

from core import storage
from core.errors import InputError, StorageError
from core.reasons import (REASON_CORRUPT_ARCHIVE, REASON_ENCRYPTED_MEMBER, REASON_LINK_MEMBER, REASON_MEMBER_NOT_FOUND,
                          REASON_NESTED_ARCHIVE, REASON_NO_IMAGES, REASON_NOT_A_FILE, REASON_TOO_LARGE,
                          REASON_UNSUPPORTED_COMPRESSION, REASON_UNSUPPORTED_URI)
from core.formats import ARCHIVE_SUFFIXES, LABEL_EXTENSIONS, MANIFEST_SUFFIXES, ZIP_SUFFIXES
from core.storage import NotAFileError, ObjectForbiddenError, ObjectNotFoundError, S3Options

MANIFEST_URI = "uri"  # manifest column names (csv header / parquet schema)
MANIFEST_MEMBER = "member"
MAX_OBJECT_BYTES = 64 << 20  # larger objects and archive members are an error row, never read into memory
_OTHER_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_MIXED_CASE_SCHEME = re.compile(r"^(?!s3:|file:)((?i:s3(?=://)|file(?=:/)))")  # not a name like File:Pug.jpg
_ZIP_UTF8_FLAG = 0x800  # general purpose bit 11: the name is UTF-8
_ZIP_ENCRYPTED_FLAG = 0x1  # bit 0: the member is encrypted (a password-protected zip)
_ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)  # what zipfile reads
_ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError, ValueError)


@dataclass(frozen=True)
class InputItem:
    uri: str
    member: str | None = None
    size: int | None = None
    error: str | None = None
    version: str | None = None  # the listed identity of the bytes (storage.object_version); members: the archive's

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

def iter_items(inputs: Sequence[str], *, extensions: Iterable[str] | None = LABEL_EXTENSIONS,
               manifest: str | None = None, s3: S3Options | None = None,
               follow_symlinks: bool = False, exclude: str | None = None) -> Iterator[InputItem]:
    """Stream the items of every input, in input order (archives whole: `iter_label_items` reads
    their members); an input with no images is an InputError. A folder's files under `exclude`
    (the run's output) are not listed."""
    exts = tuple(extensions) if extensions is not None else None
    if not inputs and manifest is None:
        raise InputError("no inputs given; pass folders, files, archives or s3:// prefixes, or --manifest")
    for raw in inputs:
        yield from _expand(storage.normalize_uri(raw), exts, s3, follow_symlinks, exclude)
    if manifest is not None:
        yield from _iter_manifest(manifest, s3)


def _expand(uri: str, exts: tuple[str, ...] | None, s3: S3Options | None,
            follow_symlinks: bool = False, exclude: str | None = None) -> Iterator[InputItem]:
    if is_archive_uri(uri):
        try:
            yield _item(storage.stat(uri, s3=s3))
        except ObjectNotFoundError:
            raise InputError(f"{uri}: archive not found; check the path") from None
        return
    if storage.parse_uri(uri).scheme == "file" and os.path.isfile(uri):
        yield _item(storage.stat(uri))
        return
    if storage.is_s3(uri) and not uri.endswith("/") and storage.parse_uri(uri).path:
        try:
            yield _item(storage.stat(uri, s3=s3))
            return
        except ObjectNotFoundError:
            pass  # not an object: a prefix
    yield from _expand_listing(uri, exts, s3, follow_symlinks, exclude)


def _expand_listing(uri: str, exts: tuple[str, ...] | None, s3: S3Options | None,
                    follow_symlinks: bool, exclude: str | None) -> Iterator[InputItem]:
    """A folder/prefix: its images and the archives found there (whole)."""
    found = 0
    listed = None if exts is None else exts + ARCHIVE_SUFFIXES
    below = _excluded_prefixes(uri, exclude)
    for info in storage.list_files(uri, extensions=listed, s3=s3, follow_symlinks=follow_symlinks, unreadable=True):
        if below and info.uri.startswith(below):
            continue
        found += 1
        yield _item(info)
    if not found:
        what = "files" if exts is None else f"images ({', '.join(exts)})"
        hint = "check the path or prefix (listing is recursive)"
        if not follow_symlinks and _has_symlinked_folders(uri):
            hint = "its sub-folders are symlinks, which are not followed unless you pass --follow-symlinks"
        raise InputError(f"{uri}: no {what} found; {hint}")


def _excluded_prefixes(root: str, exclude: str | None) -> tuple[str, ...]:
    """`exclude` (the run's output) as the listing of `root` spells what lies under it: as given,
    and, for local folders, as reached through `root` when either path goes through a symlink."""
    if not exclude:
        return ()
    prefixes = [exclude.rstrip("/") + "/"]
    if not storage.is_s3(root) and not storage.is_s3(exclude):
        real_root = os.path.realpath(storage.parse_uri(root).path)
        real_out = os.path.realpath(storage.parse_uri(exclude).path)
        if real_out.startswith(real_root.rstrip("/") + "/"):
            prefixes.append(storage.normalize_uri(root).rstrip("/") + real_out[len(real_root.rstrip("/")):] + "/")
    return tuple(prefixes)


def _has_symlinked_folders(uri: str) -> bool:
    path = storage.parse_uri(uri).path
    if storage.is_s3(uri) or not os.path.isdir(path):
        return False
    with os.scandir(path) as entries:
        return any(e.is_symlink() and e.is_dir() for e in entries)


def _item(info: storage.FileInfo) -> InputItem:
    return InputItem(info.uri, size=info.size, version=info.version)


def _archive_reason(exc: BaseException) -> str:
    """What a reader of the row can act on, in a few fixed words (Python's class names were the
    detail: "corrupt archive: ReadError" told no one whether the file was cut short or is no archive)."""
    message = str(exc)
    if isinstance(exc, NotImplementedError):
        return f"{REASON_UNSUPPORTED_COMPRESSION}: re-pack with deflate"
    if isinstance(exc, EOFError) or "unexpected end of data" in message or "Truncated" in message:
        detail = "truncated"
    elif "empty file" in message:  # what tarfile says of a .tbz cut short too: nothing decompressed
        detail = "no data (empty or truncated)"
    elif isinstance(exc, (zlib.error, lzma.LZMAError, tarfile.CompressionError)) or "compressed data" in message:
        detail = "damaged compressed data"
    elif message.startswith("Bad CRC-32"):
        detail = "damaged member (CRC mismatch)"
    elif message == "File is not a zip file":  # its directory, at the end, is missing: cut short, or no zip
        detail = "not a zip file, or truncated"
    elif isinstance(exc, tarfile.TarError):
        detail = "not a tar file, or damaged"
    else:
        detail = "damaged"
    return f"{REASON_CORRUPT_ARCHIVE}: {detail}"


def _zip_members(zf: zipfile.ZipFile, exts: tuple[str, ...] | None) -> list[zipfile.ZipInfo]:
    """Image members in archive (offset) order, so reading them is sequential; names as written."""
    for info in zf.infolist():
        info.filename = _zip_name(info)
    infos = [i for i in zf.infolist() if not i.is_dir() and _wanted_member(i.filename, exts)]
    return sorted(infos, key=lambda i: i.header_offset)


def _zip_name(info: zipfile.ZipInfo) -> str:
    """Info-ZIP's `zip` (Linux, macOS) stores UTF-8 names without the UTF-8 flag, which Python reads
    as cp437 ("perro_espa├▒ol.jpg"): a name whose bytes are valid UTF-8 is read as UTF-8, as unzip,
    7-Zip and libarchive do; cp437 stays for the others. (Reading a member checks its local header
    against `orig_filename`, which stays as it was.)"""
    if info.flag_bits & _ZIP_UTF8_FLAG:
        return info.filename
    try:
        return info.filename.encode("cp437").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return info.filename


Keep = Callable[[Sequence[InputItem]], Sequence[bool]]
_KEEP_BATCH = 1024  # listed items judged together (one vectorised lookup)


def iter_label_items(inputs: Sequence[str], manifests: Sequence[str] = (), *,
                     extensions: Iterable[str] | None = LABEL_EXTENSIONS, s3: S3Options | None = None,
                     keep: Keep | None = None, follow_symlinks: bool = False,
                     max_object_bytes: int = MAX_OBJECT_BYTES, exclude: str | None = None) -> Iterator[ItemData]:
    """Everything a label run labels, streamed in input order: plain objects without their bytes
    (the actors read them, in parallel), archive members with theirs (read here, once per archive,
    one member in memory at a time).

    `keep(items)` decides from the listing alone (uri, member, size, version) which items are
    still to label: an archive it refuses is not read at all, a plain object it refuses is never
    fetched. Members carry their archive's version. An object listed larger than
    `max_object_bytes` is an error item, never read. When several inputs or a manifest could
    list an object twice (overlapping folders, repeated lines), it is listed once (a set of
    8-byte hashes of what was listed: ~70 bytes an object in the driver). Nothing under
    `exclude` is listed: the run's own output, kept inside an input folder, is not an input
    (with --any-extension its Parquet parts and run files were labelled, more every run).
    """
    exts = tuple(extensions) if extensions is not None else None
    listings = [iter_items(inputs, extensions=exts, s3=s3, follow_symlinks=follow_symlinks, exclude=exclude)] \
        if inputs else []
    listings += [iter_items([], manifest=m, extensions=exts, s3=s3) for m in manifests]
    listed: Iterable[InputItem] = chain.from_iterable(listings)
    seen = _Seen()
    if len(inputs) + len(manifests) > 1 or manifests:
        listed = seen.once(listed)
    while batch := list(islice(listed, _KEEP_BATCH)):
        for item, wanted in zip(batch, keep(batch) if keep is not None else [True] * len(batch)):
            if not wanted:
                continue
            if item.size is not None and item.size > max_object_bytes and item.error is None and not item.is_archive:
                # an archive is streamed, one member in memory at a time: the limit is its members' own
                yield ItemData(replace(item, error=REASON_TOO_LARGE), None, REASON_TOO_LARGE)
            elif not item.is_archive:
                if item.member is None or not seen.expanded_already(item):
                    yield ItemData(item, None, item.error)
            else:
                yield from _members(item, exts, s3, keep, max_object_bytes, seen)


def _members(archive: InputItem, exts, s3, keep: Keep | None, max_bytes: int, seen: "_Seen") -> Iterator[ItemData]:
    for got in iter_archive_members(archive.uri, extensions=exts, s3=s3, max_member_bytes=max_bytes):
        member = replace(got.item, version=archive.version)
        if got.item.member is not None and not seen.expand(member):
            continue
        if keep is None or got.item.member is None or keep([member])[0]:
            yield ItemData(member, got.data, got.error)


class _Seen:
    """What a run has listed, as 8-byte hashes of (uri, member), so each is labelled once: objects
    listed twice (overlapping folders, repeated manifest lines), a member named by a manifest and
    also met in its archive listed whole, and a name found twice in one archive (`tar -r` appends a
    second `x.jpg`; the first is labelled, as the listing order puts it first)."""

    def __init__(self) -> None:
        self.listed: set[int] = set()
        self.expanded: set[int] = set()

    def once(self, items: Iterable[InputItem]) -> Iterator[InputItem]:
        for item in items:
            key = hash((item.uri, item.member))
            if key not in self.listed:
                self.listed.add(key)
                yield item

    def expand(self, member: InputItem) -> bool:
        """True the first time a member comes out of an archive, unless a manifest named it itself."""
        key = hash((member.uri, member.member))
        if key in self.expanded or key in self.listed:
            return False
        self.expanded.add(key)
        return True

    def expanded_already(self, item: InputItem) -> bool:
        return hash((item.uri, item.member)) in self.expanded


# --- manifests -----------------------------------------------------------------------------
#
# A manifest lists objects instead of a folder or prefix: `.txt` (one URI a line), `.csv` with a
# header, `.parquet`, or an S3 Inventory report as S3 writes it (its `manifest.json`, or one of its
# Parquet data files). Columns: `uri` (+ `member`), or S3 Inventory's `bucket` + `key` (+ `size`,
# `e_tag`, `version_id`, `is_latest`, `is_delete_marker`). With an ETag the row carries the
# object's version, so a scheduled run skips it unread when it was labelled before.

INVENTORY_BUCKET, INVENTORY_KEY, INVENTORY_ETAG = "bucket", "key", "e_tag"
INVENTORY_IS_LATEST, INVENTORY_DELETE_MARKER = "is_latest", "is_delete_marker"
_ETAG_COLUMNS = (INVENTORY_ETAG, "etag")


class _ManifestRow(NamedTuple):
    uri: str
    member: str | None = None
    version: str | None = None


STDIN_MANIFEST = "-"  # `--manifest -`: the list comes on standard input
_STREAM_TEXT: dict[str, str] = {}  # a stream can be read once: what it gave, for every later reader


def manifest_uri(uri: str) -> str:
    """A manifest as a run records it: absolute, `-` (standard input) as is."""
    return uri if uri == STDIN_MANIFEST else storage.normalize_uri(uri)


def is_stream(uri: str) -> bool:
    """`-`, or a pipe such as `--manifest <(find ...)` gives (/dev/fd/N): read once, as a text list."""
    if uri == STDIN_MANIFEST or uri in _STREAM_TEXT:
        return True
    if storage.is_s3(uri):
        return False
    try:
        return stat.S_ISFIFO(os.stat(storage.parse_uri(uri).path).st_mode)
    except OSError:
        return False


def manifest_identity(uri: str) -> str:
    """How a run's identity names a manifest: its URI; for standard input or a pipe also a hash
    of the lines, so that a rerun fed another list is another run, not the resumption of this one."""
    if not is_stream(uri):
        return manifest_uri(uri)
    return f"{uri}@sha256:{hashlib.sha256(_read_stream(uri).encode()).hexdigest()[:16]}"


def _read_stream(uri: str) -> str:
    if uri not in _STREAM_TEXT:
        if uri != STDIN_MANIFEST:
            with open(storage.parse_uri(uri).path, "rb") as pipe:
                _STREAM_TEXT[uri] = pipe.read().decode("utf-8-sig")
        elif sys.stdin is None or sys.stdin.isatty():
            raise InputError("--manifest -: nothing comes on standard input; pipe the list in (`find photos "
                             "-name '*.jpg' | breedlabel label --manifest - ...`) or give a file")
        else:
            _STREAM_TEXT[uri] = sys.stdin.buffer.read().decode("utf-8-sig")
    return _STREAM_TEXT[uri]


def _iter_manifest(uri: str, s3: S3Options | None) -> Iterator[InputItem]:
    """Rows are taken as objects (no listing, no HEAD); an archive row without a member is the
    whole archive. A URI of another scheme (http://…) is that row's error. Standard input and
    pipes are lists of one URI a line; their relative paths are relative to the working directory."""
    lower = uri.lower()
    stream = is_stream(uri)
    if not stream and not lower.endswith(MANIFEST_SUFFIXES):
        raise InputError(f"{uri}: unknown manifest type; use .txt (one URI a line), .csv or .parquet "
                         f"(columns {MANIFEST_URI!r}, optional {MANIFEST_MEMBER!r}; or S3 Inventory's "
                         f"{INVENTORY_BUCKET!r}, {INVENTORY_KEY!r}, {INVENTORY_ETAG!r}), or an S3 Inventory "
                         "manifest.json")
    try:
        base = os.path.join(os.getcwd(), STDIN_MANIFEST) if stream else storage.normalize_uri(uri)
        rows = _text_rows(_read_stream(uri)) if stream else _manifest_rows(uri, lower, s3)
        for row in rows:
            row_uri = _lower_scheme(row.uri)
            if (_OTHER_SCHEME.match(row_uri) and not row_uri.startswith(("s3://", "file://"))) \
                    or _remote_file_uri(row_uri):
                yield InputItem(row.uri, row.member, error=REASON_UNSUPPORTED_URI)
                continue
            yield InputItem(_resolve(base, row_uri), row.member or None, version=row.version)
    except ObjectNotFoundError:
        raise InputError(f"{uri}: manifest not found; check the path") from None


def _manifest_rows(uri: str, lower: str, s3: S3Options | None) -> Iterator[_ManifestRow]:
    if lower.endswith(".parquet"):
        yield from _parquet_rows(uri, s3)
        return
    if lower.endswith(".json"):
        yield from _inventory_rows(uri, s3)
        return
    text = storage.read_bytes(uri, s3=s3).decode("utf-8-sig")
    if lower.endswith(".txt"):
        yield from _text_rows(text)
        return
    reader = csv.DictReader(io.StringIO(text))
    columns = [c.strip().lower() for c in reader.fieldnames or ()]
    if MANIFEST_URI not in columns and not {INVENTORY_BUCKET, INVENTORY_KEY} <= set(columns):
        raise InputError(f"{uri}: CSV manifest has no {MANIFEST_URI!r} column (header: {reader.fieldnames}); "
                         f"add a header row with {MANIFEST_URI!r} and optionally {MANIFEST_MEMBER!r}, or "
                         f"S3 Inventory's {INVENTORY_BUCKET!r}, {INVENTORY_KEY!r} and {INVENTORY_ETAG!r}")
    for raw in reader:
        yield from _row({k.strip().lower(): (v or "").strip() or None for k, v in raw.items() if k})


def _row(row: dict) -> Iterator[_ManifestRow]:
    """One manifest row as an object to label: none for delete markers and non-current versions."""
    if str(row.get(INVENTORY_DELETE_MARKER, "")).lower() == "true":
        return
    if str(row.get(INVENTORY_IS_LATEST, "true")).lower() == "false":
        return
    etag = next((row[c] for c in _ETAG_COLUMNS if row.get(c)), None)
    version = storage.object_version(etag=etag) if etag else None
    if row.get(MANIFEST_URI):
        yield _ManifestRow(str(row[MANIFEST_URI]), row.get(MANIFEST_MEMBER) or None, version)
    elif row.get(INVENTORY_BUCKET) and row.get(INVENTORY_KEY):
        yield _ManifestRow(f"s3://{row[INVENTORY_BUCKET]}/{row[INVENTORY_KEY]}", None, version)


def _parquet_rows(uri: str, s3: S3Options | None) -> Iterator[_ManifestRow]:
    """Streamed in record batches: a manifest of millions of rows never sits in memory whole."""
    fs, path = storage.get_filesystem(uri, s3=s3)
    try:
        pf = pq.ParquetFile(fs.open_input_file(path))
    except FileNotFoundError:
        raise ObjectNotFoundError(uri) from None
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for bad files
        raise InputError(f"{uri}: cannot read Parquet manifest: {exc}") from None
    names = {n.lower(): n for n in pf.schema_arrow.names}
    if MANIFEST_URI not in names and not {INVENTORY_BUCKET, INVENTORY_KEY} <= set(names):
        raise InputError(f"{uri}: Parquet manifest has no {MANIFEST_URI!r} column and no S3 Inventory "
                         f"{INVENTORY_BUCKET!r}/{INVENTORY_KEY!r} columns (columns: {list(names.values())})")
    wanted = [MANIFEST_URI, MANIFEST_MEMBER, INVENTORY_BUCKET, INVENTORY_KEY, *_ETAG_COLUMNS,
              INVENTORY_IS_LATEST, INVENTORY_DELETE_MARKER]
    columns = [names[c] for c in wanted if c in names]
    for batch in pf.iter_batches(batch_size=10_000, columns=columns):
        yield from _batch_rows(pa.Table.from_batches([batch]).rename_columns([c.lower() for c in batch.schema.names]))


def _batch_rows(t: "pa.Table") -> Iterator[_ManifestRow]:
    """Column-wise `_row` for a Parquet batch: the per-row Python work of a million-line inventory
    is what bounds its listing rate."""
    import pyarrow.compute as pc

    if INVENTORY_DELETE_MARKER in t.column_names:
        t = t.filter(pc.invert(pc.fill_null(t[INVENTORY_DELETE_MARKER].cast(pa.bool_()), False)))
    if INVENTORY_IS_LATEST in t.column_names:
        t = t.filter(pc.fill_null(t[INVENTORY_IS_LATEST].cast(pa.bool_()), True))
    if MANIFEST_URI in t.column_names:
        uris = t[MANIFEST_URI]
    else:
        uris = pc.binary_join_element_wise("s3://", t[INVENTORY_BUCKET], "/", t[INVENTORY_KEY], "")
    members = t[MANIFEST_MEMBER].to_pylist() if MANIFEST_MEMBER in t.column_names else None
    etag = next((t[c] for c in _ETAG_COLUMNS if c in t.column_names), None)
    versions = pc.utf8_trim(etag.cast(pa.string()), '"').to_pylist() if etag is not None else None
    for i, uri in enumerate(uris.to_pylist()):
        if uri:
            yield _ManifestRow(uri, members[i] if members else None, (versions[i] or None) if versions else None)


def _inventory_rows(uri: str, s3: S3Options | None) -> Iterator[_ManifestRow]:
    """An S3 Inventory report as S3 writes it: `manifest.json` names its CSV (gzip) or Parquet files."""
    import gzip
    import json
    from urllib.parse import unquote_plus

    try:
        spec = json.loads(storage.read_bytes(uri, s3=s3))
        fmt, files = str(spec["fileFormat"]).upper(), [f["key"] for f in spec["files"]]
        bucket = str(spec["destinationBucket"]).rsplit(":", 1)[-1]
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{uri}: not an S3 Inventory manifest.json ({exc}); JSON manifests must be the "
                         "manifest.json of an S3 Inventory report") from None
    for key in files:
        data_uri = f"s3://{bucket}/{key}"
        if fmt == "PARQUET":
            yield from _parquet_rows(data_uri, s3)
        elif fmt == "CSV":
            schema = [_snake(c) for c in str(spec.get("fileSchema", "")).split(",")]
            text = gzip.decompress(storage.read_bytes(data_uri, s3=s3)).decode("utf-8")
            for values in csv.reader(io.StringIO(text)):
                row = dict(zip(schema, values))
                row[INVENTORY_KEY] = unquote_plus(row.get(INVENTORY_KEY, ""))  # URL-encoded: " " is "+", "+" is "%2B"
                yield from _row(row)
        else:
            raise InputError(f"{uri}: S3 Inventory format {fmt} is not supported; use CSV or Parquet")


def _snake(column: str) -> str:
    """S3 Inventory's CSV schema names ("ETag", "IsLatest") as its Parquet columns ("e_tag", "is_latest")."""
    column = column.strip()
    return {"ETag": INVENTORY_ETAG}.get(column) or "".join(
        f"_{c.lower()}" if c.isupper() and i else c.lower() for i, c in enumerate(column))


def _lower_scheme(row_uri: str) -> str:
    """`FILE:///x.jpg`, `S3://b/k`: a URI scheme is case-insensitive (RFC 3986); the rest is not."""
    match = _MIXED_CASE_SCHEME.match(row_uri)
    return match.group(1).lower() + row_uri[match.end(1):] if match else row_uri


def _remote_file_uri(row_uri: str) -> bool:
    """`file://imgs/a.jpg` names host "imgs" (RFC 8089), not a relative path: it was read as
    /a.jpg. A host other than localhost is another machine's file, which no worker can read."""
    if not row_uri.startswith("file://"):
        return False
    host = row_uri[len("file://"):].split("/", 1)[0]
    return host not in ("", "localhost")


def _text_rows(text: str) -> Iterator[_ManifestRow]:
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            yield _ManifestRow(line)


def _resolve(manifest_uri: str, row_uri: str) -> str:
    """Relative local paths in a manifest are relative to the manifest's folder; `~` is the
    home folder, as on the command line."""
    if storage.is_s3(row_uri):
        return row_uri  # kept as written (no parse: a million-line inventory lists at >50,000 rows/s)
    if row_uri.startswith("~") and os.path.expanduser(row_uri) != row_uri:
        row_uri = os.path.expanduser(row_uri)  # ~ or ~user that exists; otherwise a plain relative name
    if row_uri.startswith("file:/") or os.path.isabs(row_uri):  # file:/abs/x.jpg too (RFC 8089): not relative
        return storage.normalize_uri(row_uri)
    if storage.is_s3(manifest_uri):
        return storage.join(manifest_uri.rsplit("/", 1)[0], row_uri)
    return os.path.normpath(os.path.join(os.path.dirname(manifest_uri), row_uri))


# --- reading -----------------------------------------------------------------------------

def read_item(item: InputItem, *, s3: S3Options | None = None, max_bytes: int = MAX_OBJECT_BYTES) -> bytes:
    """Bytes of one item. For many members of one archive use `iter_archive_members` instead.

    Raises ObjectNotFoundError (vanished object), ObjectTooLargeError (over `max_bytes`),
    MemberError (a member missing, or one the archive does not give) or InputError (item error).
    """
    if item.error:
        raise InputError(f"{item.uri}: {item.error}")
    if item.member is None:
        return storage.read_bytes(item.uri, s3=s3, max_bytes=max_bytes)
    for got in iter_archive_members(item.uri, extensions=None, members={item.member}, s3=s3,
                                    max_member_bytes=max_bytes):
        if got.error:
            raise MemberError(item, got.error)
        return got.data  # type: ignore[return-value]
    raise MemberError(item, REASON_MEMBER_NOT_FOUND)


class MemberError(InputError):
    """A member named on its own (a manifest row) that the archive does not give: its row's reason
    is the one the member would get with the archive listed whole (not found, a link, too large…),
    not "cannot read", which a later run retries."""

    def __init__(self, item: InputItem, reason: str):
        self.reason = reason
        super().__init__(f"{item.uri}[{item.member}]: {reason}")


def iter_archive_members(uri: str, *, extensions: Iterable[str] | None = LABEL_EXTENSIONS,
                         members: set[str] | frozenset[str] | None = None, s3: S3Options | None = None,
                         max_member_bytes: int = MAX_OBJECT_BYTES) -> Iterator[ItemData]:
    """Every image member of one archive with its bytes, reading the archive once, one member in
    memory at a time.

    Every member that looks like an image gets an item: with its bytes, or with an error when it
    is larger than `max_member_bytes` (never read), a link (not followed: it could point outside
    the archive) or an archive itself (not expanded). An archive with no such member yields one
    item for itself, "no images in archive". `members` restricts to those names (a requested
    name that is absent yields an error item; a tar stops reading once all are found). A
    corrupt archive yields the members read so far, then one item with `error` set; a vanished
    archive yields one "not found" item.
    """
    exts = tuple(extensions) if extensions is not None else None
    wanted = set(members) if members is not None else None
    reader = (_zip_data if _is_zip(uri) else _tar_data)(uri, exts, wanted, s3, max_member_bytes)
    yielded = False
    try:
        for got in reader:
            if wanted is not None:
                wanted.discard(got.item.member)
            yielded = True
            yield got
            if wanted is not None and not wanted:
                return
    except (ObjectNotFoundError, ObjectForbiddenError, NotAFileError) as exc:  # this archive's row, not the run's end
        yield ItemData(InputItem(uri, error=exc.reason), None, exc.reason)
        return
    except StorageError:  # the storage itself failing (S3 not answering): the run stops, resumable
        raise
    except _ARCHIVE_ERRORS as exc:
        reason = _archive_reason(exc)
        yield ItemData(InputItem(uri, error=reason), None, reason)
        return
    finally:
        reader.close()  # releases the HTTP stream at once when stopping early
    for name in sorted(wanted or ()):
        yield ItemData(InputItem(uri, name, error=REASON_MEMBER_NOT_FOUND), None, REASON_MEMBER_NOT_FOUND)
    if wanted is None and not yielded:
        yield ItemData(InputItem(uri, error=REASON_NO_IMAGES), None, REASON_NO_IMAGES)


def _member_kind(name: str, exts, wanted) -> str | None:
    """What to do with a member: "read" it, flag it as a "nested" archive, or None (not listed,
    like a non-image file in a folder)."""
    if wanted is not None:
        return "read" if name in wanted else None
    if is_archive_uri(name):
        return "nested"
    return "read" if _wanted_member(name, exts) else None


def _error_item(uri: str, name: str, size: int | None, reason: str) -> ItemData:
    return ItemData(InputItem(uri, safe_name(name), size, reason), None, reason)


def safe_name(name: str) -> str:
    """A member or file name as valid UTF-8, losslessly: bytes that are not UTF-8 (kept by Python
    as surrogate escapes) become %XX escapes. A name that is valid UTF-8 is unchanged."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return quote(name.encode("utf-8", "surrogateescape"), safe="/ !#$&'()*+,;=@[]^_`{}~-.:")


def _zip_data(uri: str, exts, wanted, s3, max_bytes: int) -> Iterator[ItemData]:
    with storage.open_input(uri, s3=s3) as f, zipfile.ZipFile(f) as zf:
        for info in _zip_members(zf, None):
            kind = _member_kind(info.filename, exts, wanted)
            if kind is None:
                continue
            if kind == "nested":
                yield _error_item(uri, info.filename, info.file_size, REASON_NESTED_ARCHIVE)
            elif stat.S_ISLNK(info.external_attr >> 16):
                yield _error_item(uri, info.filename, info.file_size, REASON_LINK_MEMBER)
            elif info.flag_bits & _ZIP_ENCRYPTED_FLAG:  # zipfile raises RuntimeError: it failed the whole run
                yield _error_item(uri, info.filename, info.file_size, REASON_ENCRYPTED_MEMBER)
            elif info.compress_type not in _ZIP_METHODS:  # Deflate64 (Windows' zip of large files), PPMd, …
                method = zipfile.compressor_names.get(info.compress_type, f"method {info.compress_type}")
                yield _error_item(uri, info.filename, info.file_size,
                                  f"{REASON_UNSUPPORTED_COMPRESSION}: {method}; re-pack with deflate")
            elif info.file_size > max_bytes:
                yield _error_item(uri, info.filename, info.file_size, REASON_TOO_LARGE)
            else:
                yield _zip_member(zf, uri, info)


def _zip_member(zf: zipfile.ZipFile, uri: str, info: zipfile.ZipInfo) -> ItemData:
    item = InputItem(uri, info.filename, info.file_size)
    try:
        return ItemData(item, zf.read(info), None)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as exc:
        reason = _archive_reason(exc)
        return ItemData(replace(item, error=reason), None, reason)


def _tar_data(uri: str, exts, wanted, s3, max_bytes: int) -> Iterator[ItemData]:
    with storage.open_stream(uri, s3=s3) as f, tarfile.open(fileobj=f, mode="r|*") as tf:
        for info in tf:
            if info.isdir():
                continue
            kind = _member_kind(safe_name(info.name), exts, wanted)  # a manifest names it as its rows do
            if kind is None:
                continue
            if kind == "nested":
                yield _error_item(uri, info.name, info.size, REASON_NESTED_ARCHIVE)
            elif info.issym() or info.islnk():
                yield _error_item(uri, info.name, None, REASON_LINK_MEMBER)
            elif not info.isfile():  # a FIFO or device member: no bytes, but a row, as a folder's pipe gets
                yield _error_item(uri, info.name, None, REASON_NOT_A_FILE)
            elif info.size > max_bytes:
                yield _error_item(uri, info.name, info.size, REASON_TOO_LARGE)
            else:
                item = InputItem(uri, safe_name(info.name), info.size)
                try:
                    data = tf.extractfile(info).read()  # type: ignore[union-attr]
                except _ARCHIVE_ERRORS as exc:  # truncated mid-member: this row, then the archive's
                    reason = _archive_reason(exc)
                    yield ItemData(replace(item, error=reason), None, reason)
                    raise
                yield ItemData(item, data, None)
