"""What a labelling run skips: 64-bit keys of what finished runs already labelled.

Two kinds of key, each kept as a flat sorted uint64 array (8 bytes a key; searched with
`np.searchsorted`, shared zero-copy with Ray actors):

- content keys, `(uri, member, content_sha256, model_id)`: the output's promise (one row per
  content key). Known only after an object's bytes are read and hashed.
- listing keys, `(uri, member, version, model_id)` and, for archives, `(uri, version,
  model_id)`: what the listing alone knows (core.storage.object_version: S3 ETag, local
  mtime and size). A scheduled run skips an object, or a whole archive, whose listing key a
  finished run holds without a GET of its body; only new or changed objects are read.

Why 64 bits: a false match needs a collision (~3e-8 at a million keys, ~3e-4 at 10^8).
"""
from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass, field
from typing import Container, Iterable

import numpy as np
import pyarrow as pa

from core import schema
from core.reasons import REASON_TOO_LARGE, is_retried, reason_of
from core.sources import is_archive_uri

_ARCHIVE = "\0archive"   # the member field of an archive's own key
_VERSION = "v:"          # listing keys hash a version where content keys hash a sha256 (hex)


def _hash(*parts: str) -> int:
    return int.from_bytes(hashlib.blake2b("\0".join(parts).encode(), digest_size=8).digest(), "little")


def content_key(uri: str, member: str | None, sha256: str, model_id: str) -> int:
    return _hash(uri, member or "", sha256, model_id)


def listing_key(uri: str, member: str | None, version: str, model_id: str) -> int:
    return _hash(uri, member or "", _VERSION + version, model_id)


def archive_key(uri: str, version: str, model_id: str) -> int:
    """Every member of this archive version has a row: the archive need not be read again."""
    return _hash(uri, _ARCHIVE, _VERSION + version, model_id)


def too_large_version(version: str, max_bytes: int) -> str:
    """The version a `too large` row is remembered by: with the limit it was too large for, so a run
    with a larger --max-object-mb reads the object, and one with the same limit skips it unread."""
    return f"{version}\0max={max_bytes}"


def key_set(keys: Iterable[int] | np.ndarray) -> np.ndarray:
    arr = keys if isinstance(keys, np.ndarray) else np.fromiter(keys, dtype=np.uint64)
    return np.unique(arr.astype(np.uint64, copy=False))


def contains(keys: np.ndarray | None, value: int) -> bool:
    if keys is None or len(keys) == 0:
        return False
    i = int(np.searchsorted(keys, np.uint64(value)))
    return i < len(keys) and int(keys[i]) == value


def contains_all(keys: np.ndarray | None, values: np.ndarray) -> np.ndarray:
    """Vectorised `contains`: a bool per value."""
    values = np.asarray(values, dtype=np.uint64)
    if keys is None or len(keys) == 0:
        return np.zeros(len(values), dtype=bool)
    i = np.minimum(np.searchsorted(keys, values), len(keys) - 1)
    return keys[i] == values


@dataclass
class SkipSet:
    """The sorted content and listing keys of a set of rows."""

    content: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    listing: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))

    @classmethod
    def union(cls, sets: Iterable["SkipSet"]) -> "SkipSet":
        sets = list(sets)
        if not sets:
            return cls()
        return cls(key_set(np.concatenate([s.content for s in sets])),
                   key_set(np.concatenate([s.listing for s in sets])))

    @property
    def nbytes(self) -> int:
        return int(self.content.nbytes + self.listing.nbytes)


class KeyLog:
    """Keys of the rows a run writes, kept as it goes (8 bytes a key) for the run's `_keys` file."""

    def __init__(self, max_object_bytes: int | None = None) -> None:
        self.content, self.listing = array("Q"), array("Q")
        # the run's --max-object-mb, in bytes: `too large` rows are remembered with it (None: outputs
        # read back without knowing it, whose too-large rows count as done, as they were written)
        self.max_object_bytes = max_object_bytes
        # (uri, version, model_id) of the archives these rows come from -> [complete, a member too large]:
        # not complete once a member's read failed in a way a later run retries (it is read again)
        self.archives: dict[tuple[str, str, str], list[bool]] = {}

    def add_rows(self, rows: pa.Table, *, content: bool = True, archives: bool = True) -> None:
        """Keys of label rows (FILE_SCHEMA columns). `content=False`: only their listing keys
        (rows read, found already labelled by content, and dropped: next time, skip them unread).
        `archives=False` for the rows of an unfinished run, which may hold part of an archive.
        A row whose read failed (reasons.is_retried) keeps its content key, so a run that fails
        to read it again adds no second row, but not its listing keys: the next run reads it again."""
        cols = {c: rows.column(c).to_pylist() for c in
                (schema.URI, schema.MEMBER, schema.CONTENT_SHA256, schema.MODEL_ID, schema.VERSION, schema.ERROR)
                if c in rows.column_names}
        versions = cols.get(schema.VERSION) or [None] * rows.num_rows
        errors = cols.get(schema.ERROR) or [None] * rows.num_rows
        for uri, member, sha, model_id, version, error in zip(cols[schema.URI], cols[schema.MEMBER],
                                                              cols[schema.CONTENT_SHA256], cols[schema.MODEL_ID],
                                                              versions, errors):
            retried = is_retried(error)
            if content:  # a failed read written before UNREAD_SHA256 has the hash of no bytes, b""
                self.content.append(content_key(uri, member, schema.UNREAD_SHA256 if retried else sha, model_id))
            if version is None:
                continue
            too_large = (error is not None and self.max_object_bytes is not None
                         and reason_of(error) == REASON_TOO_LARGE)
            if not retried:
                listed = too_large_version(version, self.max_object_bytes) if too_large else version
                self.listing.append(listing_key(uri, member, listed, model_id))
            if archives and (member is not None or is_archive_uri(uri)):
                state = self.archives.setdefault((uri, version, model_id), [True, False])
                state[0] = state[0] and not retried
                state[1] = state[1] or too_large

    def skipset(self, whole_archives: Container[str] | None = None) -> SkipSet:
        """The keys, with an archive key for each archive all of whose rows are here: those listed
        whole by the run (`whole_archives`, their URIs), not an archive a manifest named only some
        members of (its other members were never labelled); None: every archive the rows come from
        (outputs written before runs kept their keys)."""
        archives = [archive_key(uri, too_large_version(version, self.max_object_bytes) if too_large else version,
                                model_id)
                    for (uri, version, model_id), (complete, too_large) in self.archives.items()
                    if complete and (whole_archives is None or uri in whole_archives)]
        listing = np.concatenate([np.frombuffer(self.listing, np.uint64), np.asarray(archives, np.uint64)])
        return SkipSet(key_set(np.frombuffer(self.content, np.uint64)), key_set(listing))
