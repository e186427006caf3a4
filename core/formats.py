"""What the product reads, by file name: the bottom of the stack, importing nothing.

Listing (`core.storage`), training ingest (`core.datasets`), labelling (`core.sources`) and the
decoder (`core.images`) agree on these without importing each other (the storage layer must not
pull in PIL and simplejpeg just to know which keys are images).
"""
from __future__ import annotations

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp")
PIL_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP")  # what a decoded file must turn out to be

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tbz", ".tar.xz", ".txz")  # tarfile streams each
ZIP_SUFFIXES = (".zip",)
ARCHIVE_SUFFIXES = TAR_SUFFIXES + ZIP_SUFFIXES
MANIFEST_SUFFIXES = (".txt", ".csv", ".parquet", ".json")
