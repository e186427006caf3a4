"""core.datasets: discovery, class selection, stratified split, fingerprint, and the resumable
Stanford Dogs fetcher against a real HTTP server on 127.0.0.1."""
from __future__ import annotations

import hashlib
import io
import shutil
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from core.breeds import STANFORD_DOGS, Breed
from core.datasets import (discover, fetch_stanford_dogs, fingerprint, limit_per_class, select_classes,
                           stratified_split)
from core.errors import ConfigError, InputError, StorageError
from tests.fixtures.images import make_synthetic_dataset


@pytest.fixture
def dataset_root(tmp_path) -> Path:
    return make_synthetic_dataset(tmp_path / "ds", num_classes=4, images_per_class=10, size=16)


def test_discover_folder_per_class(dataset_root):
    (dataset_root / STANFORD_DOGS[0].folder / "notes.txt").write_text("not an image")
    (dataset_root / STANFORD_DOGS[0].folder / ".hidden.jpg").write_bytes(b"x")
    for name in ("IMG_1.heic", "IMG_2.HEIF", "IMG_3.avif"):  # `label` lists these (a row each); training does not
        (dataset_root / STANFORD_DOGS[1].folder / name).write_bytes(b"x")
    (dataset_root / "zz-empty").mkdir()
    ds = discover(dataset_root)
    assert ds.classes == list(STANFORD_DOGS[:4])
    assert len(ds) == 40 and ds.class_counts().tolist() == [10, 10, 10, 10]
    assert all(Path(p).suffix == ".jpg" and Path(p).is_absolute() for p in ds.paths)
    assert all(Path(p).parent.name == ds.classes[label].folder for p, label in zip(ds.paths, ds.labels))


def test_discover_descends_into_images_and_plain_names(tmp_path):
    make_synthetic_dataset(tmp_path / "stanford" / "Images", num_classes=2, images_per_class=2, size=16)
    assert [b.id for b in discover(tmp_path / "stanford").classes] == [b.id for b in STANFORD_DOGS[:2]]
    plain = make_synthetic_dataset(tmp_path / "plain", 2, 2, size=16, stanford_names=False)
    assert discover(plain).classes == [Breed("class_00", "class_00"), Breed("class_01", "class_01")]


def test_discover_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        discover(tmp_path / "missing")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(InputError, match="no class folders with images"):
        discover(tmp_path / "empty")
    (tmp_path / "photo.jpg").write_bytes(b"x")
    with pytest.raises(InputError, match="photo.jpg: is a file, not a dataset folder"):
        discover(tmp_path / "photo.jpg")
    with pytest.raises(InputError, match="read a local folder; copy the dataset to local disk"):
        discover("s3://bucket/dogs/")


def test_select_classes(dataset_root):
    ds = discover(dataset_root)
    assert select_classes(ds, None) is ds
    two = select_classes(ds, 2)
    assert two.classes == list(STANFORD_DOGS[:2]) and len(two) == 20
    named = select_classes(ds, [STANFORD_DOGS[3].name, STANFORD_DOGS[1].id])
    assert named.classes == [STANFORD_DOGS[1], STANFORD_DOGS[3]]
    assert sorted(set(named.labels.tolist())) == [0, 1]
    assert all(Path(p).parent.name == named.classes[label].folder for p, label in zip(named.paths, named.labels))
    assert select_classes(ds, STANFORD_DOGS[2].folder).classes == [STANFORD_DOGS[2]]
    with pytest.raises(ConfigError, match="unknown class"):
        select_classes(ds, ["Unicorn"])
    with pytest.raises(ConfigError, match="has 4 classes"):
        select_classes(ds, 5)


def test_limit_per_class_keeps_every_class_and_the_first_files(dataset_root):
    """--per-class N (the demo preset): the first N files of each class by path, labels unchanged."""
    ds = discover(dataset_root)
    assert limit_per_class(ds, None) is ds
    three = limit_per_class(ds, 3)
    assert three.classes == ds.classes and three.class_counts().tolist() == [3, 3, 3, 3]
    for label in range(4):
        firsts = sorted(p for p, y in zip(ds.paths, ds.labels) if y == label)[:3]
        assert sorted(p for p, y in zip(three.paths, three.labels) if y == label) == firsts
    assert limit_per_class(ds, 50).paths == ds.paths


def test_stratified_split_is_deterministic_and_stratified(dataset_root, tmp_path):
    ds = discover(dataset_root)
    train, val = stratified_split(ds, val_fraction=0.2, seed=0)
    assert val.class_counts().tolist() == [2, 2, 2, 2]
    assert train.class_counts().tolist() == [8, 8, 8, 8]
    assert not set(train.paths) & set(val.paths)
    assert sorted(train.paths + val.paths) == sorted(ds.paths)
    again_train, again_val = stratified_split(discover(dataset_root), 0.2, seed=0)
    assert again_val.paths == val.paths and again_train.paths == train.paths
    assert stratified_split(ds, 0.2, seed=1)[1].paths != val.paths


def test_stratified_split_small_classes(tmp_path):
    root = make_synthetic_dataset(tmp_path / "small", num_classes=3, images_per_class=2, size=16)
    for path in list((root / STANFORD_DOGS[2].folder).iterdir())[1:]:
        path.unlink()  # class 2 keeps a single image
    train, val = stratified_split(discover(root), val_fraction=0.05, seed=3)
    assert val.class_counts().tolist() == [1, 1, 0]
    assert train.class_counts().tolist() == [1, 1, 1]
    with pytest.raises(ConfigError, match="val_fraction"):
        stratified_split(discover(root), val_fraction=1.0)


def test_fingerprint_tracks_content_not_location(dataset_root, tmp_path):
    fp = fingerprint(discover(dataset_root))
    assert len(fp) == 64 and fp == fingerprint(discover(dataset_root))
    copy = shutil.copytree(dataset_root, tmp_path / "elsewhere")
    assert fingerprint(discover(copy)) == fp
    victim = next((copy / STANFORD_DOGS[0].folder).iterdir())
    victim.write_bytes(victim.read_bytes() + b"\0")
    assert fingerprint(discover(copy)) != fp


# --- fetch_stanford_dogs against a local HTTP server -------------------------------------------

class _Server:
    """Serves one payload with Range support; can cut the first responses short."""

    def __init__(self, payload: bytes):
        self.payload, self.cut_first, self.honour_range, self.ranges = payload, 0, True, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server API
                start = 0
                header = self.headers.get("Range")
                outer.ranges.append(header)
                if header and outer.honour_range:
                    start = int(header.split("=")[1].split("-")[0])
                    if start >= len(outer.payload):
                        self.send_response(416)
                        self.end_headers()
                        return
                body = outer.payload[start:]
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if outer.cut_first > 0:
                    outer.cut_first -= 1
                    body = body[: len(body) // 3]
                    self.close_connection = True
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/images.tar"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def _stanford_tar(tmp_path: Path, extra: dict[str, bytes] | None = None) -> bytes:
    src = make_synthetic_dataset(tmp_path / "tar_src" / "Images", num_classes=2, images_per_class=3, size=16)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(src, arcname="Images")
        for name, data in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def tar_server(tmp_path):
    server = _Server(_stanford_tar(tmp_path))
    yield server
    server.close()


def test_fetch_downloads_verifies_and_extracts(tar_server, tmp_path):
    sha = hashlib.sha256(tar_server.payload).hexdigest()
    images = fetch_stanford_dogs(tmp_path / "dl", url=tar_server.url, sha256=sha)
    assert images == tmp_path / "dl" / "Images"
    assert discover(images).classes == list(STANFORD_DOGS[:2])
    assert not (tmp_path / "dl" / "images.tar").exists()
    requests = len(tar_server.ranges)
    assert fetch_stanford_dogs(tmp_path / "dl", url=tar_server.url, sha256=sha) == images
    assert len(tar_server.ranges) == requests, "a finished dataset is not downloaded again"


def test_fetch_resumes_an_interrupted_download(tar_server, tmp_path):
    sha = hashlib.sha256(tar_server.payload).hexdigest()
    tar_server.cut_first = 1
    with pytest.raises(StorageError, match="run again to resume"):
        fetch_stanford_dogs(tmp_path / "dl", url=tar_server.url, sha256=sha, retries=0)
    part = tmp_path / "dl" / "images.tar.part"
    kept = part.stat().st_size
    assert 0 < kept < len(tar_server.payload)
    images = fetch_stanford_dogs(tmp_path / "dl", url=tar_server.url, sha256=sha, retries=0)
    assert tar_server.ranges[-1] == f"bytes={kept}-"
    assert len(discover(images)) == 6 and not part.exists()


def test_fetch_retries_within_one_call_and_survives_ignored_range(tar_server, tmp_path):
    sha = hashlib.sha256(tar_server.payload).hexdigest()
    tar_server.cut_first, tar_server.honour_range = 2, False
    images = fetch_stanford_dogs(tmp_path / "dl", url=tar_server.url, sha256=sha, retries=3)
    assert len(discover(images)) == 6 and len(tar_server.ranges) == 3


def test_fetch_checksum_mismatch(tar_server, tmp_path):
    with pytest.raises(InputError, match="checksum mismatch"):
        fetch_stanford_dogs(tmp_path / "dl", url=tar_server.url, sha256="0" * 64)
    assert not (tmp_path / "dl" / "images.tar.part").exists()
    assert not (tmp_path / "dl" / "Images").exists()


def test_fetch_refuses_path_traversal(tmp_path):
    server = _Server(_stanford_tar(tmp_path, extra={"../evil.txt": b"pwned"}))
    try:
        with pytest.raises(InputError, match="outside the archive"):
            fetch_stanford_dogs(tmp_path / "dl", url=server.url, sha256=None)
    finally:
        server.close()
    assert not (tmp_path / "evil.txt").exists()
    assert not (tmp_path / "dl" / "Images").exists()


def test_fetch_http_error_is_clear(tar_server, tmp_path):
    with pytest.raises(StorageError, match="download failed"):
        fetch_stanford_dogs(tmp_path / "dl", url="http://127.0.0.1:1/images.tar", retries=0, timeout=2)


def test_official_constants():
    from core import datasets

    assert datasets.OFFICIAL_URL.endswith("/ImageNetDogs/images.tar")
    assert len(datasets.OFFICIAL_SHA256) == 64
    assert int(datasets.OFFICIAL_SHA256, 16) > 0
