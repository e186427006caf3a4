"""Every short reason that goes into a label row's `error` (and into `predict`'s per-image errors).

One table, at the bottom of the stack (no imports), so the decoder, the archive reader, the
labelling batch and the predictor speak the same words and a reader can group rows by them.
A reason may carry a detail after a colon ("corrupt archive: BadZipFile").
"""
from __future__ import annotations

# reading the bytes
REASON_NOT_FOUND = "not found"                    # vanished between listing and reading, or never there
REASON_UNREADABLE = "cannot read"                 # permission denied, a directory, an I/O error
# archives
REASON_CORRUPT_ARCHIVE = "corrupt archive"
REASON_MEMBER_NOT_FOUND = "member not found"
REASON_MEMBER_TOO_LARGE = "archive member too large"
# decoding (core.images)
REASON_EMPTY = "empty file"
REASON_NOT_IMAGE = "not an image"
REASON_UNSUPPORTED = "unsupported format"
REASON_TRUNCATED = "truncated image"
REASON_CORRUPT = "corrupt image"
REASON_TOO_MANY_PIXELS = "too many pixels"
# anything else: a bug costs one row, not the run
REASON_INTERNAL = "internal error"

