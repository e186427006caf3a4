"""One way to read, write and list objects at a URI: a local path, `file://…` or `s3://bucket/key`.

Every caller reads, writes and lists through this module. Behind it, S3 goes through boto3 for
object calls and through `pyarrow.fs.S3FileSystem` only for Parquet (`get_filesystem`: pyarrow's
multipart writer and column reader). Why not pyarrow for everything (measured on moto_server,
20,000 keys): its listing returns nothing until the whole prefix is listed (7.2 s, the first
boto3 page arrives after 0.7 s: labelling starts while a bucket of millions is still listed) and
carries no ETag (the zero-GET incremental re-run needs it); a missing key and a missing bucket
raise the same FileNotFoundError, and a dropped connection a bare OSError, the very class zip
and tar raise for a corrupt archive: a network outage would be written as "corrupt archive"
rows instead of failing the run so that it resumes; and conditional writes (the lease's
If-None-Match / If-Match) have no pyarrow call. The endpoint comes from
an explicit `S3Options(endpoint_url=...)` or `AWS_ENDPOINT_URL`, the region from
`AWS_REGION`/`AWS_DEFAULT_REGION`, credentials from the standard AWS chain: they are never
passed around, logged or written by this module.

Every failure is a `StorageError` naming the URI, what is wrong and what to do; a missing
object is the subclass `ObjectNotFoundError`, which callers turn into a row error.
"""
from __future__ import annotations

import io
import os
import posixpath
import re
import shutil
import stat as stat_module
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterable, Iterator
from urllib.parse import quote, unquote_to_bytes

from core.errors import StorageError
from core.formats import IMAGE_EXTENSIONS
from core.s3 import (READ_BUFFER_BYTES, NotAFileError, ObjectForbiddenError, ObjectNotFoundError, ObjectTooLargeError,
                     S3Options, S3RangeReader, arrow_s3, bucket_region, s3_client, s3_errors, split_s3_uri)

__all__ = [
    "FileInfo", "NotAFileError", "ObjectForbiddenError", "ObjectNotFoundError", "ObjectTooLargeError", "ParsedURI",
    "S3Options", "copy", "delete", "delete_tree", "object_version", "exists", "get_filesystem", "is_dir", "is_s3",
    "join", "list_files", "matches_extensions", "normalize_uri", "open_input", "open_stream", "parse_uri",
    "read_bytes", "read_range", "rename", "s3_client", "stat", "write_bytes",
]

DEFAULT_PAGE_SIZE = 1000  # S3's maximum keys per ListObjectsV2 page
_WHOLE_READ_MAX = 4 << 20  # remote files up to this size are opened with one GET
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass(frozen=True)
class ParsedURI:
    scheme: str  # "file" or "s3"
    bucket: str  # "" for local files
    path: str  # local path, or the S3 key (no leading slash)


@dataclass(frozen=True)
class FileInfo:
    uri: str
    size: int | None  # None: a listed name with no bytes behind it (a dangling link, a pipe)
    version: str | None = None  # what identifies these bytes without reading them (see object_version)


def object_version(*, etag: str | None = None, mtime_ns: int | None = None, size: int | None = None) -> str | None:
    """The listed identity of an object's bytes: its S3 ETag, or a local file's mtime_ns and size.

    Why: a scheduled run decides from the listing alone which objects it has labelled already,
    without a GET of their bodies; a new version of an object has a new identity. (The ETag is a
    hash of the content; a local file rewritten keeps neither its mtime nor, usually, its size.)
    """
    if etag:
        return etag.strip('"')
    if mtime_ns is not None and size is not None:
        return f"{mtime_ns}:{size}"
    return None


def _local_info(uri: str, st: os.stat_result) -> FileInfo:
    return FileInfo(local_uri(uri), st.st_size, object_version(mtime_ns=st.st_mtime_ns, size=st.st_size))


def local_uri(path: str) -> str:
    """A local path as text a Parquet row can hold, losslessly: unchanged when it is valid UTF-8,
    else a `file://` URI whose %XX escapes are its raw bytes (parse_uri turns it back)."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return "file://" + quote(os.fsencode(parse_uri(path).path))


def parse_uri(uri: str) -> ParsedURI:
    """Split a URI into scheme, bucket and path; other schemes are a StorageError."""
    if not uri:
        raise StorageError("empty URI; give a local path, file://PATH or s3://BUCKET/KEY")
    if uri.startswith("s3://"):
        bucket, key = split_s3_uri(uri)
        if not bucket:
            raise StorageError(f"{uri}: no bucket name; write s3://BUCKET/KEY")
        return ParsedURI("s3", bucket, key)
    if uri.startswith("file:/"):  # %XX escapes are bytes: a path that is not UTF-8 survives (local_uri)
        # file:/abs/x.jpg (RFC 8089's one-slash form) is /abs/x.jpg, as file:///abs/x.jpg is; a raw
        # `#`, `?` or `;` is part of the file name (people write paths), not a fragment, query or params
        path = uri[len("file:"):]
        if path.startswith("//"):  # file://HOST/path: the host is checked where one is read (a manifest line)
            path = "/" + path[2:].partition("/")[2]
        return ParsedURI("file", "", os.fsdecode(unquote_to_bytes(path)))
    if _SCHEME.match(uri):
        raise StorageError(f"{uri}: unsupported URI scheme; use a local path, file://PATH or s3://BUCKET/KEY")
    return ParsedURI("file", "", uri)


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def normalize_uri(uri: str) -> str:
    """Local paths become absolute plain paths (Ray workers run elsewhere); S3 URIs are kept."""
    p = parse_uri(uri)
    return uri if p.scheme == "s3" else os.path.abspath(os.path.expanduser(p.path))


def join(uri: str, *parts: str) -> str:
    """Append path parts to a URI, keeping its style (path, file:// or s3://)."""
    parts = tuple(p.strip("/") for p in parts if p)
    if parse_uri(uri).scheme == "s3" or uri.startswith("file://"):
        return "/".join([uri.rstrip("/"), *parts]) if parts else uri
    return os.path.join(uri, *parts)


def matches_extensions(name: str, extensions: Iterable[str] | None) -> bool:
    """Case-insensitive suffix test; `None` accepts every name (extension-less keys too)."""
    if extensions is None:
        return True
    lower = name.lower()
    return any(lower.endswith(ext if ext.startswith(".") else "." + ext) for ext in (e.lower() for e in extensions))


@contextmanager
def _local_errors(uri: str, action: str) -> Iterator[None]:
    try:
        yield
    except FileNotFoundError:
        if action == "write":  # its folder cannot be made (e.g. under /proc)
            raise StorageError(f"{uri}: cannot {action} there (no such folder, and it cannot be created); "
                               "give another path") from None
        raise ObjectNotFoundError(uri) from None
    except PermissionError:
        if action == "read":
            raise ObjectForbiddenError(uri, "file permissions") from None
        raise StorageError(f"{uri}: permission denied while trying to {action}; check file permissions") from None
    except IsADirectoryError:
        raise StorageError(f"{uri}: is a directory, cannot {action}; give a file") from None
    except OSError as exc:
        raise StorageError(f"{uri}: cannot {action}: {exc.strerror or exc}") from None


# --- objects ----------------------------------------------------------------------------------

def check_writable_folder(path: str, what: str) -> None:
    """Refuse, before a long job starts, a local folder it could not create or write: the path is a
    file, or the nearest existing folder above it is not writable (checked by writing, which works
    for root too)."""
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise StorageError(f"{path}: is a file; give a folder for {what}")
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".breedlabel-write-check-", dir=existing))
    except OSError as e:
        raise StorageError(f"{path}: cannot write {what} there ({existing}: {e.strerror or e}); "
                           "give another folder") from None


def read_bytes(uri: str, *, s3: S3Options | None = None, max_bytes: int | None = None) -> bytes:
    """The whole object; ObjectTooLargeError before reading a body larger than `max_bytes`."""
    p = parse_uri(uri)
    if p.scheme == "s3":
        with s3_errors(uri, "read", s3):
            resp = s3_client(s3).get_object(Bucket=p.bucket, Key=p.path)
            size = int(resp.get("ContentLength") or 0)
            if max_bytes is not None and size > max_bytes:
                resp["Body"].close()
                raise ObjectTooLargeError(uri, size, max_bytes)
            return resp["Body"].read()
    with _local_errors(uri, "read"), _open_file(uri, p.path) as f:
        size = os.fstat(f.fileno()).st_size
        if max_bytes is None:
            return f.read()
        if size > max_bytes:
            raise ObjectTooLargeError(uri, size, max_bytes)
        data = f.read(max_bytes + 1)  # a pipe or device says size 0 and may never end
        if len(data) > max_bytes:
            raise ObjectTooLargeError(uri, None, max_bytes)
        return data


def read_range(uri: str, offset: int, length: int, *, s3: S3Options | None = None) -> bytes:
    """`length` bytes from `offset` (fewer at the end of the object)."""
    if length <= 0:
        return b""
    p = parse_uri(uri)
    if p.scheme == "s3":
        with s3_errors(uri, "read", s3):
            rng = f"bytes={offset}-{offset + length - 1}"
            return s3_client(s3).get_object(Bucket=p.bucket, Key=p.path, Range=rng)["Body"].read()
    with _local_errors(uri, "read"), open(p.path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() gives a new file here; read once, at import


def write_bytes(uri: str, data: bytes, *, s3: S3Options | None = None) -> None:
    """Write a whole object; local writes go to a temp file renamed into place (atomic)."""
    p = parse_uri(uri)
    if p.scheme == "s3":
        with s3_errors(uri, "write", s3):
            s3_client(s3).put_object(Bucket=p.bucket, Key=p.path, Body=data)
        return
    with _local_errors(uri, "write"):
        parent = os.path.dirname(os.path.abspath(p.path))
        os.makedirs(parent, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(p.path)}.", suffix=".tmp")
        try:
            os.fchmod(fd, _FILE_MODE)  # mkstemp's 0600 would stay: a review file Label Studio cannot read
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, p.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


def stat(uri: str, *, s3: S3Options | None = None) -> FileInfo:
    """Size and version of one file/object; ObjectNotFoundError when absent (or a directory)."""
    p = parse_uri(uri)
    if p.scheme == "s3":
        with s3_errors(uri, "stat", s3):
            head = s3_client(s3).head_object(Bucket=p.bucket, Key=p.path)
        return FileInfo(uri, int(head["ContentLength"]), object_version(etag=head.get("ETag")))
    if not os.path.isfile(p.path):
        raise ObjectNotFoundError(uri)
    with _local_errors(uri, "stat"):
        return _local_info(uri, os.stat(p.path))


def exists(uri: str, *, s3: S3Options | None = None) -> bool:
    """True for an existing file/object (local directories count too)."""
    if parse_uri(uri).scheme == "file":
        return os.path.exists(parse_uri(uri).path)
    try:
        stat(uri, s3=s3)
        return True
    except ObjectNotFoundError:
        return False


def is_dir(uri: str, *, s3: S3Options | None = None) -> bool:
    """A local directory, or an S3 prefix with at least one object under it."""
    p = parse_uri(uri)
    if p.scheme == "file":
        return os.path.isdir(p.path)
    return next(iter(list_files(uri, extensions=None, page_size=1, s3=s3)), None) is not None


def delete(uri: str, *, missing_ok: bool = True, s3: S3Options | None = None) -> None:
    p = parse_uri(uri)
    if p.scheme == "s3":  # S3 deletes are idempotent: no way to tell "missing" without a HEAD
        if not missing_ok and not exists(uri, s3=s3):
            raise ObjectNotFoundError(uri)
        with s3_errors(uri, "delete", s3):
            s3_client(s3).delete_object(Bucket=p.bucket, Key=p.path)
        return
    try:
        with _local_errors(uri, "delete"):
            os.remove(p.path)
    except ObjectNotFoundError:
        if not missing_ok:
            raise


def delete_tree(uri: str, *, s3: S3Options | None = None) -> None:
    """Remove a directory/prefix and everything under it (e.g. an abandoned staging area)."""
    p = parse_uri(uri)
    if p.scheme == "file":
        shutil.rmtree(p.path, ignore_errors=True)
        return
    batch: list[dict] = []
    for info in list_files(uri, extensions=None, s3=s3):
        batch.append({"Key": parse_uri(info.uri).path})
        if len(batch) == 1000:
            _delete_batch(uri, p.bucket, batch, s3)
            batch = []
    if batch:
        _delete_batch(uri, p.bucket, batch, s3)


def _delete_batch(uri: str, bucket: str, keys: list[dict], s3: S3Options | None) -> None:
    with s3_errors(uri, "delete", s3):
        s3_client(s3).delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})


def copy(src: str, dst: str, *, s3: S3Options | None = None) -> None:
    """Copy one object between any two URIs (server-side within S3)."""
    ps, pd = parse_uri(src), parse_uri(dst)
    if ps.scheme == "s3" and pd.scheme == "s3":
        with s3_errors(src, f"copy to {dst}", s3):
            s3_client(s3).copy({"Bucket": ps.bucket, "Key": ps.path}, pd.bucket, pd.path)
    elif ps.scheme == "file" and pd.scheme == "file":
        with _local_errors(src, f"copy to {dst}"):
            os.makedirs(os.path.dirname(os.path.abspath(pd.path)), exist_ok=True)
            tmp = f"{pd.path}.{os.getpid()}.tmp"
            shutil.copyfile(ps.path, tmp)
            os.replace(tmp, pd.path)
    elif ps.scheme == "file":
        with _local_errors(src, "read"), s3_errors(dst, "upload", s3):
            s3_client(s3).upload_file(ps.path, pd.bucket, pd.path)
    else:
        write_bytes(dst, read_bytes(src, s3=s3), s3=s3)


def rename(src: str, dst: str, *, s3: S3Options | None = None) -> None:
    """Publish a staged file: atomic `os.replace` locally, copy + delete on S3."""
    ps, pd = parse_uri(src), parse_uri(dst)
    if ps.scheme == pd.scheme == "file":
        with _local_errors(src, f"rename to {dst}"):
            os.makedirs(os.path.dirname(os.path.abspath(pd.path)), exist_ok=True)
            os.replace(ps.path, pd.path)
        return
    copy(src, dst, s3=s3)
    delete(src, s3=s3)


# --- listing -------------------------------------------------------------------------------

def list_files(uri: str, extensions: Iterable[str] | None = IMAGE_EXTENSIONS, *,
               page_size: int = DEFAULT_PAGE_SIZE, s3: S3Options | None = None,
               follow_symlinks: bool = False, unreadable: bool = False) -> Iterator[FileInfo]:
    """Files under a directory/prefix, recursively, streamed (S3: one page at a time).

    Order is deterministic: sorted within each directory (local) or page (S3 pages are in
    key order already). A local file given directly yields itself if it matches. Symlinks to
    files are listed; symlinks to directories are not followed unless `follow_symlinks` (a
    `latest -> 2024-06` link would list a month twice), and then each directory at most once
    (no loop, no repeat). With `unreadable`, names with no file behind them (a dangling or
    looping link, a pipe, a device) are listed too, with size None: the label job gives each a
    row saying why; everything else (a UI gallery, a bundle's files) would trip on them.
    """
    exts = tuple(extensions) if extensions is not None else None
    p = parse_uri(uri)
    if p.scheme == "s3":
        yield from _list_s3(uri, p, exts, page_size, s3)
        return
    if os.path.isfile(p.path):
        if matches_extensions(p.path, exts):
            yield _local_info(uri, os.stat(p.path))
        return
    if not os.path.isdir(p.path):
        if os.path.exists(p.path):  # a pipe, a device, a socket
            raise StorageError(f"{uri}: not a regular file or a folder; give a folder, an image or an archive")
        raise StorageError(f"{uri}: no such file or directory; check the path")
    seen = {(os.stat(p.path).st_dev, os.stat(p.path).st_ino)}
    yield from _list_local(uri, p.path, exts, (), follow_symlinks, seen, unreadable)


def _list_local(uri: str, root: str, exts: tuple[str, ...] | None, rel: tuple[str, ...],
                follow: bool, seen: set[tuple[int, int]], unreadable: bool) -> Iterator[FileInfo]:
    """Depth-first in S3 key order (a directory sorts as `name/`): same order for both schemes."""
    path = os.path.join(root, *rel)
    try:
        with os.scandir(path) as it:
            entries = sorted(((e.name + "/" if _is_dir(e, follow) else e.name), e) for e in it)
    except OSError as exc:
        raise StorageError(f"{uri}: cannot list {path}: {exc.strerror}; check permissions") from None
    for key, entry in entries:
        try:
            if key.endswith("/"):
                st = entry.stat()
                if (st.st_dev, st.st_ino) not in seen:  # a symlink loop, or a directory linked twice
                    seen.add((st.st_dev, st.st_ino))
                    yield from _list_local(uri, root, exts, (*rel, entry.name), follow, seen, unreadable)
            elif matches_extensions(entry.name, exts):
                if _is_file(entry):
                    yield _local_info(join(uri, *rel, entry.name), entry.stat())
                elif unreadable and not _is_dir(entry):  # its row says "not found" / "not a regular file"
                    yield FileInfo(local_uri(join(uri, *rel, entry.name)), None)
        except FileNotFoundError:
            continue  # vanished while listing


def _is_file(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file()
    except OSError:  # a symlink loop (ELOOP): no file behind the name
        return False


def _is_dir(entry: os.DirEntry, follow: bool = True) -> bool:
    try:
        return entry.is_dir(follow_symlinks=follow)
    except OSError:  # a symlink loop
        return False


def _list_s3(uri: str, p: ParsedURI, exts: tuple[str, ...] | None, page_size: int,
             s3: S3Options | None) -> Iterator[FileInfo]:
    prefix = p.path if not p.path or p.path.endswith("/") else p.path + "/"
    paginator = s3_client(s3).get_paginator("list_objects_v2")
    pages = paginator.paginate(Bucket=p.bucket, Prefix=prefix, PaginationConfig={"PageSize": page_size})
    with s3_errors(uri, "list", s3):
        for page in pages:
            keys = sorted((o["Key"], o["Size"], o.get("ETag")) for o in page.get("Contents", ()))
            for key, size, etag in keys:
                if not key.endswith("/") and matches_extensions(key, exts):
                    yield FileInfo(f"s3://{p.bucket}/{key}", int(size), object_version(etag=etag))


# --- file handles -----------------------------------------------------------------------

def open_input(uri: str, *, s3: S3Options | None = None) -> IO[bytes]:
    """A seekable binary file (e.g. for `zipfile`); S3 reads are buffered range requests."""
    p = parse_uri(uri)
    if p.scheme == "s3":
        size = stat(uri, s3=s3).size
        if size <= _WHOLE_READ_MAX:  # one GET beats several range requests
            return io.BytesIO(read_bytes(uri, s3=s3))
        return io.BufferedReader(S3RangeReader(uri, p.bucket, p.path, size, s3), buffer_size=READ_BUFFER_BYTES)
    with _local_errors(uri, "open"):
        return _open_file(uri, p.path)


def _open_file(uri: str, path: str) -> IO[bytes]:
    """open(path, "rb") of a regular file (following links); NotAFileError for anything else: a
    FIFO would block the open until something writes to it, a device may never end."""
    mode = os.stat(path).st_mode
    if not stat_module.S_ISREG(mode):
        kind = ("a directory" if stat_module.S_ISDIR(mode) else "a pipe" if stat_module.S_ISFIFO(mode)
                else "a device" if stat_module.S_ISCHR(mode) or stat_module.S_ISBLK(mode) else "a socket")
        raise NotAFileError(uri, kind)
    return open(path, "rb")


def open_stream(uri: str, *, s3: S3Options | None = None) -> IO[bytes]:
    """A forward-only stream of the whole object in one request (e.g. for streaming tar)."""
    p = parse_uri(uri)
    if p.scheme == "s3":
        with s3_errors(uri, "read", s3):
            return s3_client(s3).get_object(Bucket=p.bucket, Key=p.path)["Body"]
    return open_input(uri)


def get_filesystem(uri: str, *, s3: S3Options | None = None):
    """`(pyarrow.fs.FileSystem, path)` so pyarrow.parquet / pyarrow.dataset can read and write there."""
    import pyarrow.fs as pafs

    p = parse_uri(uri)
    if p.scheme == "file":
        return pafs.LocalFileSystem(), os.path.abspath(p.path)
    opts = (s3 or S3Options()).resolved()
    fs = arrow_s3(opts.endpoint_url, opts.region or bucket_region(p.bucket, opts), opts.read_timeout_s,
                  opts.max_attempts)
    return fs, posixpath.join(p.bucket, p.path)
