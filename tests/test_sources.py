"""core.sources: folders, prefixes, archives (local and S3) and manifests into items and bytes."""
from __future__ import annotations

import io
import os
import tarfile
import uuid
import zipfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core import s3, sources, storage
from core.errors import InputError
from core.sources import InputItem, ItemData

# Archive members in archive order; bytes need not be real images here (decoding is core.images').
MEMBERS = {"dogs/b.jpg": b"B" * 300, "dogs/a.PNG": b"A" * 10, "notes.txt": b"n",
           "__MACOSX/dogs/._b.jpg": b"x", "dogs/sub/c.webp": b"C" * 7}
IMAGES = ["dogs/b.jpg", "dogs/a.PNG", "dogs/sub/c.webp"]


def _tar(compress: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=f"w:{compress}") as tf:
        for name, data in MEMBERS.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in MEMBERS.items():
            zf.writestr(name, data)
    return buf.getvalue()


ARCHIVES = {"batch.tar": lambda: _tar(""), "batch.tar.gz": lambda: _tar("gz"),
            "batch.tgz": lambda: _tar("gz"), "batch.tar.bz2": lambda: _tar("bz2"), "batch.tar.xz": lambda: _tar("xz"),
            "batch.tbz2": lambda: _tar("bz2"), "batch.tbz": lambda: _tar("bz2"), "batch.txz": lambda: _tar("xz"),
            "batch.zip": _zip}


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    if request.param == "s3":
        moto_s3 = request.getfixturevalue("moto_s3")
        return moto_s3.make_bucket(f"src-{uuid.uuid4().hex[:12]}") + "/in"
    return str(tmp_path)


def _put(root: str, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        storage.write_bytes(storage.join(root, name), data)


def test_folder_is_listed_recursively_and_sorted(root):
    _put(root, {"b/2.jpg": b"22", "a/1.JPEG": b"1", "a.png": b"333", "skip.txt": b"t"})
    items = list(sources.iter_items([root]))
    rel = [i.uri[len(storage.normalize_uri(root)):] for i in items]
    assert rel == ["/a.png", "/a/1.JPEG", "/b/2.jpg"]
    assert [i.size for i in items] == [3, 1, 2]
    assert [sources.read_item(i) for i in items] == [b"333", b"1", b"22"]
    assert list(sources.iter_label_items([root])) == [ItemData(i, None, None) for i in items]  # actors read them


def test_phone_photos_are_listed_for_labelling(root):
    """`.heic`/`.heif`/`.avif` files were skipped like non-images: a phone dump's HEIC photos were
    missing from its labels without a word. The label listing has them, in folders and archives
    (each gets its row: labelled, or why not); `--any-extension` aside, a `.txt` is still not listed."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("IMG_5.HEIC", b"5")
        zf.writestr("notes.txt", b"n")
    _put(root, {"IMG_1.HEIC": b"1", "IMG_2.heif": b"2", "IMG_3.avif": b"3", "IMG_4.jpg": b"4", "notes.txt": b"t",
                "phone.zip": buf.getvalue()})
    got = [(os.path.basename(d.item.uri), d.item.member, d.error) for d in sources.iter_label_items([root])]
    assert got == [("IMG_1.HEIC", None, None), ("IMG_2.heif", None, None), ("IMG_3.avif", None, None),
                   ("IMG_4.jpg", None, None), ("phone.zip", "IMG_5.HEIC", None)]


def test_the_runs_own_output_inside_an_input_is_not_listed(root):
    _put(root, {"a.jpg": b"1", "labels/part-0.parquet": b"p", "labels/_last_run.json": b"{}",
                "labels2/b.jpg": b"2"})
    out = storage.normalize_uri(storage.join(root, "labels"))
    listed = [d.item.uri for d in sources.iter_label_items([root], extensions=None, exclude=out)]
    assert [u[len(storage.normalize_uri(root)):] for u in listed] == ["/a.jpg", "/labels2/b.jpg"]
    with pytest.raises(InputError, match="no files found"):  # a folder that holds only the output has no inputs
        list(sources.iter_label_items([storage.join(root, "labels")], extensions=None, exclude=out))



def test_the_runs_own_output_is_not_listed_through_a_symlink(tmp_path):
    """The input folder, or --out, reached through a symlink: the run listed its own files (the
    live lease, its staging) and labelled them, more every run."""
    _put(str(tmp_path / "real"), {"a.jpg": b"1", "labels/part-0.parquet": b"p"})
    (tmp_path / "via").symlink_to(tmp_path / "real")
    real, via = tmp_path / "real", tmp_path / "via"
    for inputs, out in [(via, real / "labels"), (real, via / "labels")]:
        listed = [d.item.uri for d in sources.iter_label_items([str(inputs)], extensions=None, exclude=str(out))]
        assert listed == [str(inputs / "a.jpg")], (inputs, out)


def test_names_with_no_bytes_behind_them_get_a_row_each(tmp_path):
    """Rows out = objects in: a dangling link or a pipe named *.jpg in a folder was not listed (no
    row, no count), nor a FIFO or device member of a tar; a pipe named *.tar, once listed, must be
    its own row, not the end of the run."""
    from core import labelling

    folder = tmp_path / "photos"
    _put(str(folder), {"a.jpg": b"1"})
    (folder / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (folder / "loop.jpg").symlink_to(folder / "loop.jpg")  # ELOOP: it failed the whole listing
    os.mkfifo(folder / "pipe.jpg")
    os.mkfifo(folder / "pipe.tar")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, kind in (("fifo.jpg", tarfile.FIFOTYPE), ("dev.jpg", tarfile.CHRTYPE)):
            info = tarfile.TarInfo(name)
            info.type = kind
            tf.addfile(info)
        info = tarfile.TarInfo("ok.jpg")
        info.size = 2
        tf.addfile(info, io.BytesIO(b"ok"))
    (folder / "odd.tar").write_bytes(buf.getvalue())
    items = list(sources.iter_label_items([str(folder)]))
    plain = [d.item.uri for d in items if not d.item.uri.endswith(".tar")]
    read = dict(zip(plain, labelling.fetch(plain, [None] * len(plain)).errors))
    assert read == {str(folder / "a.jpg"): None, str(folder / "gone.jpg"): "not found",
                    str(folder / "loop.jpg"): "cannot read", str(folder / "pipe.jpg"): "not a regular file"}
    archives = {(os.path.basename(d.item.uri), d.item.member): d.error for d in items if d.item.uri.endswith(".tar")}
    assert archives == {("odd.tar", "fifo.jpg"): "not a regular file", ("odd.tar", "dev.jpg"): "not a regular file",
                        ("odd.tar", "ok.jpg"): None, ("pipe.tar", None): "not a regular file"}


def test_single_file_and_extension_less(root):
    _put(root, {"one.jpg": b"1", "blobs/k1": b"k"})
    one = storage.join(root, "one.jpg")
    (item,) = sources.iter_items([one])
    assert (item.uri, item.size) == (storage.normalize_uri(one), 1) and item.version  # ETag, or mtime:size
    blobs = list(sources.iter_items([storage.join(root, "blobs")], extensions=None))
    assert [sources.read_item(i) for i in blobs] == [b"k"]


def test_local_relative_paths_become_absolute(tmp_path, monkeypatch):
    _put(str(tmp_path), {"x/1.jpg": b"1"})
    monkeypatch.chdir(tmp_path)
    assert [i.uri for i in sources.iter_items(["x"])] == [str(tmp_path / "x" / "1.jpg")]


@pytest.mark.parametrize("name", list(ARCHIVES))
def test_archive_members_listed_and_read_once(root, name):
    uri = storage.join(root, name)
    storage.write_bytes(uri, ARCHIVES[name]())
    (whole,) = sources.iter_items([uri])
    assert whole.is_archive and whole.uri == storage.normalize_uri(uri)
    got = list(sources.iter_archive_members(uri))
    assert [(g.item.member, g.data, g.error) for g in got] == [(m, MEMBERS[m], None) for m in IMAGES]
    labelled = list(sources.iter_label_items([uri]))  # the label job's listing: members with their bytes
    assert [(d.item.member, d.item.size, d.data) for d in labelled] == [(m, len(MEMBERS[m]), MEMBERS[m])
                                                                       for m in IMAGES]
    assert {d.item.version for d in labelled} == {whole.version}  # a member is as new as its archive
    assert sources.read_item(labelled[1].item) == MEMBERS[IMAGES[1]]


def test_archives_inside_a_folder_are_expanded(root):
    _put(root, {"a.jpg": b"a", "z/batch.zip": _zip()})
    items = [d.item for d in sources.iter_label_items([root])]
    assert [(os.path.basename(i.uri), i.member) for i in items] == [("a.jpg", None)] + [
        ("batch.zip", m) for m in IMAGES
    ]


@pytest.mark.parametrize("name,data", [
    ("bad.zip", b"PK\x03\x04 not really a zip"),
    ("bad.tar.gz", b"\x1f\x8b\x08 garbage"),
    ("bad.tar", b"x" * 1000),
])
def test_corrupt_archive_is_one_error_item(root, name, data):
    uri = storage.join(root, name)
    storage.write_bytes(uri, data)
    got = list(sources.iter_archive_members(uri))
    assert len(got) == 1 and got[0].data is None and got[0].error.startswith("corrupt archive")
    (only,) = sources.iter_label_items([uri])
    assert only.data is None and only.error.startswith("corrupt archive")


def _deflate64_zip() -> bytes:
    """A zip whose second member says Deflate64 (method 9), as Windows' Explorer writes large
    files: zipfile cannot read it; the bytes are not damaged."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("ok.jpg", b"fine")
        zf.writestr("big.jpg", b"packed")
    data = bytearray(buf.getvalue())
    local = data.index(b"PK\x03\x04", 1)  # the second member's local header: method at +8
    central = data.index(b"PK\x01\x02", data.index(b"PK\x01\x02") + 1)  # its directory entry: method at +10
    data[local + 8:local + 10] = data[central + 10:central + 12] = (9).to_bytes(2, "little")
    return bytes(data)


@pytest.mark.parametrize("name, data, error", [
    ("empty.tar", b"", "corrupt archive: no data (empty or truncated)"),
    ("text.tar", b"hello " * 200, "corrupt archive: not a tar file, or damaged"),
    ("text.zip", b"hello " * 200, "corrupt archive: not a zip file, or truncated"),
    ("cut.tar", None, "corrupt archive: truncated"),
])
def test_an_unreadable_archive_says_why_in_words(root, name, data, error):
    """The detail was Python's class name ("corrupt archive: ReadError", "…: BadZipFile")."""
    if data is None:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            info = tarfile.TarInfo("a.jpg")
            info.size = 20_000
            tf.addfile(info, io.BytesIO(os.urandom(20_000)))
        data = buf.getvalue()[:10_000]
    uri = storage.join(root, name)
    storage.write_bytes(uri, data)
    assert [g.error for g in sources.iter_archive_members(uri)][-1] == error


def test_a_zip_member_packed_with_an_unsupported_method_is_not_called_corrupt(root):
    uri = storage.join(root, "win.zip")
    storage.write_bytes(uri, _deflate64_zip())
    got = [(g.item.member, g.data, g.error) for g in sources.iter_archive_members(uri)]
    assert got == [("ok.jpg", b"fine", None),
                   ("big.jpg", None, "unsupported compression: deflate64; re-pack with deflate")]


def test_truncated_archive_keeps_what_was_read(root):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name in ("a.jpg", "b.jpg", "c.jpg"):
            info = tarfile.TarInfo(name)
            info.size = 20_000
            tf.addfile(info, io.BytesIO(os.urandom(20_000)))  # incompressible: the cut lands in b
    uri = storage.join(root, "cut.tgz")
    storage.write_bytes(uri, buf.getvalue()[:30_000])
    got = [(g.item.member, g.data is not None, g.error) for g in sources.iter_archive_members(uri)]
    assert got == [("a.jpg", True, None), ("b.jpg", False, "corrupt archive: truncated"),
                   (None, False, "corrupt archive: truncated")]
    rows = [(d.item.member, d.data is not None) for d in sources.iter_label_items([uri])]
    assert rows == [("a.jpg", True), ("b.jpg", False), (None, False)]


def test_missing_member_is_a_row_error(tmp_path):
    uri = str(tmp_path / "b.zip")
    storage.write_bytes(uri, _zip())
    ghost = InputItem(uri, "dogs/ghost.jpg")
    got = list(sources.iter_archive_members(uri, members={ghost.member}))
    assert [(g.item.member, g.data, g.error) for g in got] == [(ghost.member, None, "member not found")]
    with pytest.raises(InputError, match="member not found"):
        sources.read_item(ghost)


def test_object_deleted_between_list_and_read(moto_s3):
    root = moto_s3.make_bucket(f"gone-{uuid.uuid4().hex[:12]}")
    _put(root, {"p/1.jpg": b"1", "p/2.jpg": b"2"})
    items = list(sources.iter_items([f"{root}/p/"]))
    storage.delete(items[0].uri)
    with pytest.raises(storage.ObjectNotFoundError, match="not found"):
        sources.read_item(items[0])
    assert sources.read_item(items[1]) == b"2"


def test_manifests_txt_csv_parquet(root):
    _put(root, {"imgs/1.jpg": b"1", "imgs/2.jpg": b"2", "b.tar": _tar("")})
    base = storage.normalize_uri(root)
    one, two, tar = (storage.join(base, p) for p in ("imgs/1.jpg", "imgs/2.jpg", "b.tar"))
    expected = [InputItem(one), InputItem(two), InputItem(tar, "dogs/a.PNG")]
    storage.write_bytes(storage.join(root, "m.txt"), f"# batch\n{one}\n\n  {two}\n".encode())
    storage.write_bytes(storage.join(root, "m.csv"),
                        f"uri,member\n{one},\n{two},\n{tar},dogs/a.PNG\n".encode())
    fs, path = storage.get_filesystem(storage.join(root, "m.parquet"))
    pq.write_table(pa.table({"uri": [one, two, tar], "member": [None, None, "dogs/a.PNG"]}), path, filesystem=fs)
    assert list(sources.iter_items([], manifest=storage.join(root, "m.txt"))) == expected[:2]
    for kind in ("csv", "parquet"):
        items = list(sources.iter_items([], manifest=storage.join(root, f"m.{kind}")))
        assert items == expected
        assert [sources.read_item(i) for i in items] == [b"1", b"2", MEMBERS["dogs/a.PNG"]]


def test_manifest_relative_paths_and_archive_rows(tmp_path):
    _put(str(tmp_path), {"imgs/1.jpg": b"1", "b.zip": _zip()})
    (tmp_path / "m.txt").write_text("imgs/1.jpg\nb.zip\n")
    items = [d.item for d in sources.iter_label_items([], [str(tmp_path / "m.txt")])]
    assert items[0] == InputItem(str(tmp_path / "imgs" / "1.jpg"))
    assert [(i.uri, i.member) for i in items[1:]] == [(str(tmp_path / "b.zip"), m) for m in IMAGES]


def test_manifest_from_standard_input_or_a_pipe(tmp_path, monkeypatch):
    """`find ... | breedlabel label --manifest -` and `--manifest <(find ...)` were refused as an
    "unknown manifest type" (no extension): both are lists of one URI a line, relative paths
    relative to the working directory."""
    import threading

    _put(str(tmp_path), {"imgs/1.jpg": b"1", "imgs/2.jpg": b"2"})
    monkeypatch.chdir(tmp_path)
    stdin = io.TextIOWrapper(io.BytesIO(b"imgs/1.jpg\n# a comment\n" + str(tmp_path / "imgs/2.jpg").encode()))
    monkeypatch.setattr("sys.stdin", stdin)
    monkeypatch.setattr(sources, "_STREAM_TEXT", {})
    want = [str(tmp_path / "imgs" / "1.jpg"), str(tmp_path / "imgs" / "2.jpg")]
    identity = sources.manifest_identity("-")  # reads it: a stream gives its lines once
    assert identity.startswith("-@sha256:") and identity == sources.manifest_identity("-")
    assert [d.item.uri for d in sources.iter_label_items([], ["-"])] == want
    assert [d.item.uri for d in sources.iter_label_items([], ["-"])] == want  # again, from what it gave
    assert sources.manifest_uri("-") == "-" and sources.manifest_uri("m.txt") == str(tmp_path / "m.txt")
    fifo = tmp_path / "list"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text("imgs/1.jpg\nimgs/2.jpg\n"))
    writer.start()
    assert [d.item.uri for d in sources.iter_label_items([], [str(fifo)])] == want
    writer.join()

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr("sys.stdin", Terminal())
    monkeypatch.setattr(sources, "_STREAM_TEXT", {})
    with pytest.raises(InputError, match="nothing comes on standard input; pipe the list in"):
        list(sources.iter_label_items([], ["-"]))


def test_manifest_home_and_host_forms(tmp_path, monkeypatch):
    """`~/x.jpg` in a manifest was taken relative to the manifest's folder ("not found"), and
    `file://imgs/a.jpg` (host "imgs", by RFC 8089) was silently read as /a.jpg."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    _put(str(tmp_path), {"home/x.jpg": b"x", "imgs/a.jpg": b"a"})
    lines = ["~/x.jpg", "file://imgs/a.jpg", f"file://localhost{tmp_path / 'imgs' / 'a.jpg'}",
             "~nosuchuser-rt/y.jpg"]
    (tmp_path / "m.txt").write_text("".join(line + "\n" for line in lines))
    items = [d.item for d in sources.iter_label_items([], [str(tmp_path / "m.txt")])]
    assert [(i.uri, i.error) for i in items] == [(str(tmp_path / "home" / "x.jpg"), None),
                                                 ("file://imgs/a.jpg", "unsupported URI scheme"),
                                                 (str(tmp_path / "imgs" / "a.jpg"), None),
                                                 (str(tmp_path / "~nosuchuser-rt" / "y.jpg"), None)]  # no such user


def test_manifest_file_uri_with_one_slash_is_absolute(tmp_path):
    """`file:/abs/a.jpg` (RFC 8089's one-slash form) was taken as a name relative to the manifest's
    folder ("<manifest folder>/file:/abs/a.jpg", not found); it is /abs/a.jpg, as `file:///abs/a.jpg` is."""
    _put(str(tmp_path), {"imgs/a b.jpg": b"a", "imgs/c.jpg": b"c"})
    (tmp_path / "lists").mkdir()
    manifest = tmp_path / "lists" / "m.txt"
    manifest.write_text(f"file:{tmp_path}/imgs/a%20b.jpg\nfile://{tmp_path}/imgs/c.jpg\n")
    items = [d.item for d in sources.iter_label_items([], [str(manifest)])]
    assert [(i.uri, i.error) for i in items] == [(str(tmp_path / "imgs" / "a b.jpg"), None),
                                                 (str(tmp_path / "imgs" / "c.jpg"), None)]
    assert [sources.read_item(i) for i in items] == [b"a", b"c"]


def test_manifest_file_uris_keep_hash_query_and_semicolon_and_any_scheme_case(tmp_path):
    """`file:/x/a#b.jpg` was the row of /x/a ("not found"; it would have labelled /x/a had it
    existed), `?` and `;` cut the name the same way, and `FILE:///x.jpg` was "unsupported URI
    scheme": people write paths after `file:`, and a scheme's case does not matter."""
    names = ["a#b.jpg", "q?x=1.jpg", "p;1.jpg", "up.jpg", "100%.jpg", "File:Pug.jpg", "S3:cover.jpg"]
    _put(str(tmp_path), {f"imgs/{n}": n.encode() for n in names} | {"imgs/a": b"not me"})
    manifest = tmp_path / "imgs" / "m.txt"
    manifest.write_text(f"file:{tmp_path}/imgs/a#b.jpg\nfile://{tmp_path}/imgs/q?x=1.jpg\n"
                        f"file://localhost{tmp_path}/imgs/p;1.jpg\nFILE://{tmp_path}/imgs/up.jpg\n"
                        f"File:{tmp_path}/imgs/100%25.jpg\n"
                        "File:Pug.jpg\nS3:cover.jpg\n")  # relative names (Wikimedia's), not schemes
    items = [d.item for d in sources.iter_label_items([], [str(manifest)])]
    assert [(i.uri, i.error) for i in items] == [(str(tmp_path / "imgs" / n), None) for n in names]
    assert [sources.read_item(i) for i in items] == [n.encode() for n in names]


def test_input_errors_are_clear(tmp_path):
    with pytest.raises(InputError, match="no inputs given"):
        list(sources.iter_items([]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images"):
        list(sources.iter_items([str(tmp_path / "empty")]))
    with pytest.raises(InputError, match="archive not found"):
        list(sources.iter_items([str(tmp_path / "nope.zip")]))
    (tmp_path / "m.csv").write_text("path\nx.jpg\n")
    with pytest.raises(InputError, match="no 'uri' column"):
        list(sources.iter_items([], manifest=str(tmp_path / "m.csv")))
    with pytest.raises(InputError, match="unknown manifest type"):
        list(sources.iter_items([], manifest=str(tmp_path / "m.yaml")))


@pytest.mark.parametrize("name,whole_read_max,max_gets", [
    ("batch.tar.gz", None, 1), ("batch.zip", None, 1), ("batch.zip", 0, 3)])
def test_s3_archive_is_read_in_one_pass(moto_s3, monkeypatch, name, whole_read_max, max_gets):
    if whole_read_max is not None:  # force the seekable range reader, tail smaller than the zip
        monkeypatch.setattr(storage, "_WHOLE_READ_MAX", whole_read_max)
        monkeypatch.setattr(s3, "TAIL_BYTES", 200)
    uri = moto_s3.make_bucket(f"pass-{uuid.uuid4().hex[:12]}") + "/" + name
    storage.write_bytes(uri, ARCHIVES[name]())
    client = storage.s3_client()
    calls: list[str] = []
    real = client._make_api_call
    monkeypatch.setattr(client, "_make_api_call", lambda op, p: calls.append(op) or real(op, p))
    assert [d.data for d in sources.iter_label_items([uri])] == [MEMBERS[m] for m in IMAGES]
    assert calls.count("GetObject") <= max_gets, calls


def test_a_folder_of_symlinked_folders_says_how_to_follow_them(tmp_path):
    (tmp_path / "real" / "dogs").mkdir(parents=True)
    (tmp_path / "real" / "dogs" / "a.jpg").write_bytes(b"jpeg")
    (tmp_path / "linked").mkdir()
    os.symlink(tmp_path / "real" / "dogs", tmp_path / "linked" / "dogs")
    with pytest.raises(sources.InputError, match="symlinks, which are not followed unless you pass --follow-sym"):
        list(sources.iter_items([str(tmp_path / "linked")]))
    assert [i.uri for i in sources.iter_items([str(tmp_path / "linked")], follow_symlinks=True)] == [
        str(tmp_path / "linked" / "dogs" / "a.jpg")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(sources.InputError, match="check the path or prefix"):
        list(sources.iter_items([str(tmp_path / "empty")]))


def _archive_with(members: list[tuple[str, bytes]], kind: str) -> bytes:
    buf = io.BytesIO()
    if kind == "zip":
        import warnings

        with zipfile.ZipFile(buf, "w") as zf, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Duplicate name": what an appended zip holds
            for name, data in members:
                zf.writestr(name, data)
    else:
        with tarfile.open(fileobj=buf, mode="w") as tf:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_each_member_name_is_labelled_once(tmp_path, kind):
    """A name twice in one archive (`tar -r` appends a second x.jpg) gave two rows in one run, and a
    member a manifest names beside its archive listed whole gave two rows too."""
    arc = tmp_path / f"a.{kind}"
    arc.write_bytes(_archive_with([("x.jpg", b"first"), ("y.jpg", b"y"), ("x.jpg", b"second")], kind))
    got = [(d.item.member, d.data) for d in sources.iter_label_items([str(arc)])]
    assert got == [("x.jpg", b"first"), ("y.jpg", b"y")]
    for rows in ([f"{arc},y.jpg", f"{arc},"], [f"{arc},", f"{arc},y.jpg"]):  # the member before or after
        manifest = tmp_path / "m.csv"
        manifest.write_text("uri,member\n" + "\n".join(rows) + "\n")
        members = sorted(d.item.member for d in sources.iter_label_items([], [str(manifest)]))
        assert members == ["x.jpg", "y.jpg"], rows


def test_a_manifest_names_a_non_utf8_tar_member_as_the_output_wrote_it(tmp_path):
    """A member whose name is not UTF-8 is written as `caf%E9.jpg`; a manifest of rows to label
    again (read back from the output) named it so, and got "member not found": the archive was
    searched for its raw name."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        info = tarfile.TarInfo(b"caf\xe9.jpg".decode("utf-8", "surrogateescape"))
        info.size = 4
        tf.addfile(info, io.BytesIO(b"cafe"))
    archive = tmp_path / "a.tar"
    archive.write_bytes(buf.getvalue())
    (listed,) = sources.iter_label_items([str(archive)])
    assert listed.item.member == "caf%E9.jpg" and listed.data == b"cafe"
    pq.write_table(pa.table({"uri": [str(archive)], "member": [listed.item.member]}), tmp_path / "again.parquet")
    (named,) = sources.iter_label_items([], [str(tmp_path / "again.parquet")])
    assert (named.item.member, named.error) == ("caf%E9.jpg", None)
    assert sources.read_item(named.item) == b"cafe"  # a member named by a manifest is read on its own


def test_zip_names_info_zip_wrote_in_utf8_without_the_flag(tmp_path):
    """Info-ZIP's `zip` (Linux, macOS) writes UTF-8 names without the UTF-8 flag: Python read them as
    cp437, so `member` said "perro_espa├▒ol.jpg" and a manifest naming the real member matched
    nothing. Names of other bytes stay cp437 (what old DOS/Windows tools wrote)."""
    names = {b"perro_espaXXol.jpg": "perro_español.jpg".encode(), b"XXX.jpg": "犬.jpg".encode(),
             b"cafX.jpg": b"caf\x82.jpg"}  # the last: cp437 for "café.jpg", not valid UTF-8
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for placeholder in names:
            zf.writestr(placeholder.decode(), b"photo")  # ASCII: written without the UTF-8 flag
    data = buf.getvalue()
    for placeholder, raw in names.items():
        assert len(placeholder) == len(raw)
        data = data.replace(placeholder, raw)  # local header and central directory, as Info-ZIP writes them
    arc = tmp_path / "z.zip"
    arc.write_bytes(data)
    got = sorted((d.item.member, d.data) for d in sources.iter_label_items([str(arc)]))
    assert got == [("café.jpg", b"photo"), ("perro_español.jpg", b"photo"), ("犬.jpg", b"photo")]
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"uri,member\n{arc},犬.jpg\n", encoding="utf-8")
    (named,) = sources.iter_label_items([], [str(manifest)])
    assert named.item.member == "犬.jpg" and sources.read_item(named.item) == b"photo"


def test_an_encrypted_zip_member_is_its_rows_error(tmp_path):
    """A password-protected zip (`zip -P`) failed the whole label run with zipfile's RuntimeError
    ("… is encrypted, password required"), and every rerun the same: its members are rows now."""
    import struct

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("secret.jpg", b"photo")
        zf.writestr("open.jpg", b"other")
    data = bytearray(buf.getvalue())
    first = data.find(b"PK\x01\x02")  # the central directory entry of secret.jpg: flag bit 0, encrypted
    struct.pack_into("<H", data, first + 8, struct.unpack_from("<H", data, first + 8)[0] | 0x1)
    struct.pack_into("<H", data, 6, struct.unpack_from("<H", data, 6)[0] | 0x1)  # and its local header
    arc = tmp_path / "locked.zip"
    arc.write_bytes(bytes(data))
    got = [(d.item.member, d.data, d.error) for d in sources.iter_label_items([str(arc)])]
    assert got == [("secret.jpg", None, "encrypted member (not read)"), ("open.jpg", b"other", None)]


def test_a_member_named_alone_gets_the_reason_it_would_get_listed_whole(tmp_path):
    """A manifest row naming a member the archive lacks, or a link member, said "cannot read",
    which every later run retries (reading the archive again) for good."""
    from core.labelling import fetch
    from core.reasons import REASON_LINK_MEMBER, REASON_MEMBER_NOT_FOUND

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    (tmp_path / "a.tar").write_bytes(buf.getvalue())
    uri = str(tmp_path / "a.tar")
    fetched = fetch([uri, uri], ["nope.jpg", "link.jpg"])
    assert fetched.errors == [REASON_MEMBER_NOT_FOUND, REASON_LINK_MEMBER]


def test_the_size_limit_is_each_members_not_the_archives(tmp_path):
    """An archive larger than --max-object-mb was refused whole (one `too large` row, no member read),
    though archives are streamed a member at a time."""
    arc = tmp_path / "a.tar"
    arc.write_bytes(_archive_with([("x.jpg", b"x" * 600), ("y.jpg", b"y" * 600), ("big.jpg", b"b" * 1500)], "tar"))
    got = [(d.item.member, d.error) for d in sources.iter_label_items([str(arc)], max_object_bytes=1000)]
    assert got == [("x.jpg", None), ("y.jpg", None), ("big.jpg", "too large")]
