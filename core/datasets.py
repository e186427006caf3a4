"""Folder-per-class datasets: discover, pick classes, split, fingerprint, fetch Stanford Dogs.

A dataset is a list of file paths plus integer labels into an ordered class list, nothing more:
training turns it into tf.data / Ray Data, evaluation reads it, card.json records its
fingerprint. Decoding is core.images' job.
"""
from __future__ import annotations

import hashlib
import http.client
import logging
import os
import shutil
import tarfile
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from core.breeds import Breed, parse_class_dir
from core.errors import ConfigError, InputError, StorageError
from core.formats import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)

OFFICIAL_URL = "http://vision.stanford.edu/aditya86/ImageNetDogs/images.tar"
# From TensorFlow Datasets' url_checksums/stanford_dogs.txt (not re-downloaded here to verify).
OFFICIAL_SHA256 = "a443fc2f9a851aa1a7b8e4fa4af94b8459fce2c9f5a2f4dd4669cf9673a4ec58"
IMAGES_DIR = "Images"
_CHUNK = 1 << 20


@dataclass(frozen=True, eq=False)
class ImageFolder:
    """Files and labels; `labels[i]` indexes `classes` for `paths[i]`; `root` is the class-folder parent."""

    paths: list[str]
    labels: np.ndarray
    classes: list[Breed]
    root: str

    def __len__(self) -> int:
        return len(self.paths)

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=len(self.classes))

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageFolder:
        """The same classes, only the files at `indices` (in the order given)."""
        idx = np.asarray(indices, dtype=np.int64)
        return ImageFolder([self.paths[i] for i in idx], self.labels[idx], list(self.classes), self.root)


def discover(root: str | os.PathLike) -> ImageFolder:
    """Read a folder-per-class tree (Stanford `Images/` layout, or any ImageFolder).

    Given the folder that holds `Images/` it descends into it. Classes are the sub-folders that
    contain at least one image (sorted by name); files are matched by extension, hidden ones skipped."""
    if "://" in str(root) and not str(root).startswith("file://"):
        raise InputError(f"{root}: training and evaluation read a local folder; copy the dataset to local disk "
                         "(e.g. `aws s3 sync`) and give that folder")
    base = Path(str(root).removeprefix("file://")).expanduser()
    if not base.is_dir():
        what = "is a file, not a dataset folder" if base.is_file() else "dataset folder does not exist"
        raise InputError(f"{base}: {what}; give a folder with one sub-folder per class")
    if (base / IMAGES_DIR).is_dir():
        base = base / IMAGES_DIR
    classes: list[Breed] = []
    paths: list[str] = []
    labels: list[int] = []
    for folder in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = image_files(folder)
        if not files:
            log.warning("%s: no images (%s), class skipped", folder, ", ".join(IMAGE_EXTENSIONS))
            continue
        paths.extend(files)
        labels.extend([len(classes)] * len(files))
        classes.append(parse_class_dir(folder.name))
    if not classes:
        raise InputError(f"{base}: no class folders with images ({', '.join(IMAGE_EXTENSIONS)}); "
                         "expected <root>/<class>/<image> as in Stanford Dogs' Images/")
    return ImageFolder(paths, np.asarray(labels, dtype=np.int64), classes, os.path.abspath(base))


def image_files(folder: str | os.PathLike) -> list[str]:
    """Every image under `folder` (any depth; hidden files and folders skipped), absolute, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [os.path.join(dirpath, f) for f in sorted(filenames)
                  if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    return [os.path.abspath(p) for p in found]


def select_classes(ds: ImageFolder, classes: int | Sequence[str] | None) -> ImageFolder:
    """Keep the first N classes, or those named by id, name, display name or folder name.

    The result keeps the dataset's class order and relabels 0..K-1."""
    if classes is None:
        return ds
    if isinstance(classes, int):
        if not 1 <= classes <= len(ds.classes):
            raise ConfigError(f"classes={classes}: the dataset at {ds.root} has {len(ds.classes)} classes")
        keep = list(range(classes))
    else:
        keep = _class_indices(ds, [classes] if isinstance(classes, str) else list(classes))
    remap = np.full(len(ds.classes), -1, dtype=np.int64)
    remap[keep] = np.arange(len(keep))
    mask = remap[ds.labels] >= 0
    idx = np.flatnonzero(mask)
    return ImageFolder([ds.paths[i] for i in idx], remap[ds.labels[idx]], [ds.classes[i] for i in keep], ds.root)


def limit_per_class(ds: ImageFolder, per_class: int | None) -> ImageFolder:
    """At most `per_class` files of each class, the first by path: a quick run (the demo) on a
    subset that keeps every class and stays the same from run to run."""
    if per_class is None:
        return ds
    keep = []
    for label in range(len(ds.classes)):
        members = np.flatnonzero(ds.labels == label)
        keep.extend(members[np.argsort([ds.paths[i] for i in members], kind="stable")][:per_class])
    return ds.subset(np.sort(np.asarray(keep, dtype=np.int64)))


def _class_indices(ds: ImageFolder, wanted: list[str]) -> list[int]:
    lookup: dict[str, int] = {}
    for i, b in enumerate(ds.classes):
        for key in (b.id, b.name, b.display, b.folder):
            lookup.setdefault(key.lower(), i)
    unknown = [w for w in wanted if str(w).lower() not in lookup]
    if unknown:
        sample = ", ".join(b.folder for b in ds.classes[:5])
        raise ConfigError(f"unknown class(es) {unknown} in {ds.root}; use a class id, name or folder "
                          f"(e.g. {sample}, ...)")
    return sorted({lookup[str(w).lower()] for w in wanted})


def stratified_split(ds: ImageFolder, val_fraction: float = 0.2, seed: int = 0) -> tuple[ImageFolder, ImageFolder]:
    """Deterministic per-class split: each class puts round(n*val_fraction) files in val, at least
    one on each side when it has ≥ 2 files. Each class is shuffled by its own generator (seed +
    folder name), so adding a class or a file elsewhere does not reshuffle the others."""
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction={val_fraction}: must be strictly between 0 and 1")
    train_idx: list[np.ndarray] = []
    val_idx: list[np.ndarray] = []
    for label, breed in enumerate(ds.classes):
        members = np.flatnonzero(ds.labels == label)
        members = members[np.argsort([ds.paths[i] for i in members], kind="stable")]
        n = len(members)
        n_val = 0 if n < 2 else min(max(int(round(n * val_fraction)), 1), n - 1)
        rng = np.random.default_rng([seed, zlib.crc32(breed.folder.encode("utf-8"))])
        perm = members[rng.permutation(n)]
        val_idx.append(perm[:n_val])
        train_idx.append(perm[n_val:])
    train = np.sort(np.concatenate(train_idx)) if train_idx else np.array([], np.int64)
    val = np.sort(np.concatenate(val_idx)) if val_idx else np.array([], np.int64)
    return ds.subset(train), ds.subset(val)


def fingerprint(ds: ImageFolder) -> str:
    """sha256 over (class folder, path relative to root, file size) of every file: cheap (stat only),
    and changes when a file is added, removed, renamed, relabelled or resized."""
    digest = hashlib.sha256()
    for breed in ds.classes:
        digest.update(f"class\t{breed.folder}\n".encode())
    for path, label in zip(ds.paths, ds.labels):
        rel = os.path.relpath(path, ds.root).replace(os.sep, "/")
        digest.update(f"{int(label)}\t{rel}\t{os.stat(path).st_size}\n".encode())
    return digest.hexdigest()


def fetch_stanford_dogs(dest: str | os.PathLike, url: str = OFFICIAL_URL, sha256: str | None = OFFICIAL_SHA256,
                        resume: bool = True, *, retries: int = 3, timeout: float = 60.0, keep_archive: bool = False,
                        progress: Callable[[int, int | None], None] | None = None) -> Path:
    """Download, verify and extract Stanford Dogs' images.tar into `dest`; return `dest/Images`.

    Idempotent: an already extracted dataset is returned at once. The download goes to
    `images.tar.part` and resumes with an HTTP Range request after an interruption (within
    `retries`, or on the next call). sha256=None skips verification."""
    dest = Path(dest).expanduser()
    images_dir, marker = dest / IMAGES_DIR, dest / ".images.complete"
    if marker.exists() and images_dir.is_dir():
        return images_dir
    dest.mkdir(parents=True, exist_ok=True)
    archive = dest / Path(url.split("?")[0]).name
    if not archive.exists():
        part = archive.with_name(archive.name + ".part")
        _download(url, part, resume=resume, retries=retries, timeout=timeout, progress=progress)
        _verify(part, sha256, url)
        os.replace(part, archive)
    _extract(archive, dest)
    marker.write_text(f"{url}\n{sha256 or ''}\n")
    if not keep_archive:
        archive.unlink()
    return images_dir


def _download(url: str, part: Path, *, resume: bool, retries: int, timeout: float,
              progress: Callable[[int, int | None], None] | None) -> None:
    if not resume and part.exists():
        part.unlink()
    for attempt in range(retries + 1):
        try:
            _download_once(url, part, timeout, progress)
            return
        except (OSError, http.client.HTTPException, _Interrupted) as exc:
            if isinstance(exc, urllib.error.HTTPError) and exc.code not in (408, 429, 500, 502, 503, 504):
                raise StorageError(f"{url}: HTTP {exc.code} {exc.reason}; check the URL") from None
            if attempt == retries:
                have = part.stat().st_size if part.exists() else 0
                raise StorageError(f"{url}: download failed ({exc}); {have} bytes kept in {part}, "
                                   "run again to resume") from None
            log.warning("%s: download interrupted (%s), resuming (attempt %d/%d)", url, exc, attempt + 1, retries)
            time.sleep(min(2.0 ** attempt, 10.0) * 0.1)


class _Interrupted(Exception):
    """The server closed the connection before Content-Length bytes arrived."""


def _download_once(url: str, part: Path, timeout: float, progress: Callable[[int, int | None], None] | None) -> None:
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 - http(s) URL by design
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing left to fetch: the .part is already whole
            return
        raise
    with response:
        if have and response.status != 206:  # server ignored the Range: start over
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        with open(part, "ab" if have else "wb") as out:
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                have += len(chunk)
                if progress:
                    progress(have, total)
    if total is not None and have < total:
        raise _Interrupted(f"got {have} of {total} bytes")


def _verify(part: Path, sha256: str | None, url: str) -> None:
    if not sha256:
        return
    digest = hashlib.sha256()
    with open(part, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    if digest.hexdigest() != sha256.lower():
        part.unlink()
        raise InputError(f"{url}: checksum mismatch (sha256 {digest.hexdigest()}, expected {sha256}); "
                         "the partial file was deleted, run again to download afresh")


def _extract(archive: Path, dest: Path) -> None:
    """Extract into a temporary folder, refusing any member that could land outside it, then
    move `Images/` into place so a half-extracted tree is never mistaken for the dataset."""
    tmp = dest / ".extracting"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if _safe_member(m, archive)]
            tar.extractall(tmp, members=members, filter="data")
    except tarfile.TarError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        archive.unlink(missing_ok=True)
        raise InputError(f"{archive}: not a readable tar ({exc}); deleted it, run again to download afresh") from None
    if not (tmp / IMAGES_DIR).is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
        raise InputError(f"{archive}: has no {IMAGES_DIR}/ folder; is this Stanford Dogs' images.tar?")
    shutil.rmtree(dest / IMAGES_DIR, ignore_errors=True)
    os.replace(tmp / IMAGES_DIR, dest / IMAGES_DIR)
    shutil.rmtree(tmp, ignore_errors=True)


def _safe_member(member: tarfile.TarInfo, archive: Path) -> bool:
    name = member.name.replace("\\", "/")
    if name.startswith("/") or ".." in name.split("/") or (len(name) > 1 and name[1] == ":"):
        raise InputError(f"{archive}: member {member.name!r} points outside the archive; refusing to extract")
    return member.isfile() or member.isdir()
