"""The label job with S3 over real HTTP (moto_server on 127.0.0.1): bucket in, bucket out,
an archive on S3, a key that vanished, and an incremental rerun reading the finished run back."""
from __future__ import annotations

import io
import tarfile

import pyarrow.dataset as pads
import pytest

from core import output, storage
from core.label_config import LabelConfig
from jobs.label import label
from tests.fixtures.images import jpeg_bytes, png_bytes

SMALL = dict(actors=1, cpus_per_actor=1, batch_size=4, rows_per_file=5, io_threads=4, progress=False)


@pytest.fixture
def buckets(moto_s3):
    src, dst = moto_s3.make_bucket("label-in"), moto_s3.make_bucket("label-out")
    client = moto_s3.client()
    for i in range(5):
        client.put_object(Bucket="label-in", Key=f"photos/d{i}/p{i}.jpg", Body=jpeg_bytes(40 + i, 30))
    client.put_object(Bucket="label-in", Key="photos/notes.jpg", Body=b"plain text, not a photo")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in {"a.jpg": jpeg_bytes(30, 30), "b.png": png_bytes(20, 20)}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    client.put_object(Bucket="label-in", Key="packs/pack.tar", Body=buf.getvalue())
    client.put_object(Bucket="label-in", Key="lists/manifest.txt", Body=b"s3://label-in/photos/vanished.jpg\n")
    return src, dst


@pytest.mark.slow
def test_bucket_in_bucket_out_and_incremental(ray_local, buckets, tiny_bundle):
    src, dst = buckets
    out = f"{dst}/labels"
    base = dict(inputs=(f"{src}/photos/", f"{src}/packs/pack.tar"), manifests=(f"{src}/lists/manifest.txt",),
                model=str(tiny_bundle), out=out, **SMALL)
    m = label(LabelConfig(**base))
    assert m[output.M_IMAGES] == 5 + 1 + 2 + 1
    assert m[output.M_ERRORS_BY_KIND] == {"not an image": 1, "not found": 1}
    fs, path = storage.get_filesystem(out)
    table = pads.dataset(path, filesystem=fs, format="parquet").to_table()
    assert table.num_rows == 9
    assert sorted(k for k in table.column("member").to_pylist() if k) == ["a.jpg", "b.png"]
    assert set(table.column("uri").to_pylist()) >= {f"{src}/packs/pack.tar", f"{src}/photos/d0/p0.jpg"}
    assert not storage.exists(f"{out}/_staging/run_id={m[output.M_RUN_ID]}/{output.MANIFEST_FILE}")
    assert storage.exists(f"{out}/run_id={m[output.M_RUN_ID]}/{output.MANIFEST_FILE}")

    again = label(LabelConfig(**base))  # nothing new: every row is skipped (rows with errors too)
    # 6 photos and the tar (counted once) unread, from the listing; the manifest's line has no
    # version, so it was read: "not found" again, no second row, counted as still unreadable
    assert again[output.M_IMAGES] == 0 and again[output.M_SKIPPED] == 7
    assert again[output.M_STILL_UNREADABLE] == {"not found": 1}
    assert output.Output(out).read_finished().num_rows == 9


@pytest.mark.slow
def test_keys_with_hash_and_question_mark_are_the_objects_listed(ray_local, moto_s3, tiny_bundle):
    """'#' and '?' are plain characters of an S3 key, not a fragment or a query: each row reads its own
    object (not the key cut at '#'), and an output prefix holding them is written where it says."""
    src, dst = moto_s3.make_bucket("odd-in"), moto_s3.make_bucket("odd-out")
    client = moto_s3.client()
    bodies = {"odd/dog": jpeg_bytes(50, 40), "odd/dog#cat.jpg": jpeg_bytes(30, 30), "odd/q?x=1.jpg": png_bytes(20, 20)}
    for key, body in bodies.items():
        client.put_object(Bucket="odd-in", Key=key, Body=body)
    out = f"{dst}/runs?x=1#y"
    label(LabelConfig(inputs=(f"{src}/odd/",), model=str(tiny_bundle), out=out, **SMALL))
    rows = {row["uri"]: row for row in output.Output(out).read_finished().to_pylist()}
    assert set(rows) == {f"{src}/odd/dog#cat.jpg", f"{src}/odd/q?x=1.jpg"}  # odd/dog: no image extension
    for uri, row in rows.items():
        assert row["error"] is None and row["bytes"] == len(bodies[uri[len(src) + 1:]])
    assert client.list_objects_v2(Bucket="odd-out", Prefix="runs?x=1#y/run_id=")["KeyCount"] > 0


@pytest.mark.slow
def test_a_manifest_naming_one_member_does_not_mark_the_archive_done(ray_local, moto_s3, buckets, tiny_bundle):
    """A manifest row for one member of an archive (with the archive's ETag) made the finished run hold
    the whole archive's key: a later run over the archive skipped it unread, and its other members
    were never labelled ("nothing new to label", exit 0)."""
    src, dst = buckets
    out = f"{dst}/members"
    etag = storage.stat(f"{src}/packs/pack.tar").version
    moto_s3.client().put_object(Bucket="label-in", Key="lists/one.csv",
                    Body=f'uri,member,e_tag\n{src}/packs/pack.tar,a.jpg,"{etag}"\n'.encode())
    first = label(LabelConfig(manifests=(f"{src}/lists/one.csv",), model=str(tiny_bundle), out=out, **SMALL))
    assert first[output.M_IMAGES] == 1
    whole = label(LabelConfig(inputs=(f"{src}/packs/pack.tar",), model=str(tiny_bundle), out=out, **SMALL))
    assert whole[output.M_LABELLED] == 1 and whole[output.M_SKIPPED] == 1  # b.png labelled, a.jpg skipped
    rows = output.Output(out).read_finished()
    assert sorted(rows.column("member").to_pylist()) == ["a.jpg", "b.png"]
    again = label(LabelConfig(inputs=(f"{src}/packs/pack.tar",), model=str(tiny_bundle), out=out, **SMALL))
    assert again[output.M_IMAGES] == 0 and again[output.M_SKIPPED] == 1  # listed whole now: skipped unread
