"""What the product reads, by file name: the bottom of the stack, importing nothing.

Listing (`core.storage`), training ingest (`core.datasets`), labelling (`core.sources`) and the
decoder (`core.images`) agree on these without importing each other (the storage layer must not
pull in PIL and simplejpeg just to know which keys are images).
"""
from __future__ import annotations

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp")  # what training ingest reads
# Phone formats: `label` lists them too, so each gets its row (AVIF decoded where Pillow has libavif,
# HEIC/HEIF "unsupported format (HEIF)") instead of missing from a phone dump's labels without a word.
# Training keeps to IMAGE_EXTENSIONS: one undecodable photo in a class folder would fail the run.
PHONE_EXTENSIONS = (".heic", ".heif", ".avif")
LABEL_EXTENSIONS = IMAGE_EXTENSIONS + PHONE_EXTENSIONS
PIL_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP")  # what a decoded file must turn out to be
OPTIONAL_PIL_FORMATS = ("AVIF",)  # also decoded where the installed Pillow has the codec (core.images)

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tbz", ".tar.xz", ".txz")  # tarfile streams each
ZIP_SUFFIXES = (".zip",)
ARCHIVE_SUFFIXES = TAR_SUFFIXES + ZIP_SUFFIXES
MANIFEST_SUFFIXES = (".txt", ".csv", ".parquet", ".json")
