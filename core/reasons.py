"""Every short reason that goes into a label row's `error` (and into `predict`'s per-image errors).

One table, at the bottom of the stack (no imports), so the decoder, the archive reader, the
labelling batch and the predictor speak the same words and a reader can group rows by them.
A reason may carry a detail after a colon ("corrupt archive: truncated"): a few fixed words, never
a name or a number that varies by file, so that a run's `errors_by_kind` stays a short list.
"""
from __future__ import annotations

# reading the bytes
REASON_NOT_FOUND = "not found"                    # vanished between listing and reading, or never there
REASON_FORBIDDEN = "access denied"                # the object exists, these credentials may not read it
REASON_NOT_A_FILE = "not a regular file"         # a directory, pipe or device named as an image: never opened
REASON_UNREADABLE = "cannot read"                 # a directory, an I/O error
REASON_UNSUPPORTED_URI = "unsupported URI scheme"  # a manifest line such as https://… (s3:// and paths only)
# archives
REASON_CORRUPT_ARCHIVE = "corrupt archive"
REASON_MEMBER_NOT_FOUND = "member not found"
REASON_TOO_LARGE = "too large"                    # over --max-object-mb: never read into memory
REASON_LINK_MEMBER = "link member (not followed)"  # a tar symlink or hard link
REASON_NESTED_ARCHIVE = "nested archive (not expanded)"
REASON_ENCRYPTED_MEMBER = "encrypted member (not read)"  # a password-protected zip member
REASON_UNSUPPORTED_COMPRESSION = "unsupported compression"  # a zip member packed with e.g. Deflate64: not damaged
REASON_NO_IMAGES = "no images in archive"         # the archive's own row: nothing in it to label
# decoding (core.images)
REASON_EMPTY = "empty file"
REASON_NOT_IMAGE = "not an image"
REASON_UNSUPPORTED = "unsupported format"
REASON_TRUNCATED = "truncated image"
REASON_CORRUPT = "corrupt image"
REASON_TOO_MANY_PIXELS = "too many pixels"
# anything else: a bug costs one row, not the run
REASON_INTERNAL = "internal error"

# Read failures the next run tries again: the bytes were never seen, and what stopped the read
# (a permission, an object re-created, a flaky disk) is fixed outside the bucket's listing. A
# failure of the bytes themselves (not an image, a corrupt archive) repeats, so it is not retried.
RETRIED_REASONS = frozenset({REASON_NOT_FOUND, REASON_FORBIDDEN, REASON_UNREADABLE})


def reason_of(error: str) -> str:
    """The short reason of a row's `error`, without its detail ("corrupt archive: truncated")."""
    return error.split(":", 1)[0].strip()


def is_retried(error: str | None) -> bool:
    """Whether a row with this `error` is read again by the next run over the same inputs."""
    return error is not None and reason_of(error) in RETRIED_REASONS
