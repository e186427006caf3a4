"""A scheduled run costs what changed: objects (and whole archives) whose listed version a finished
run labelled are skipped without a GET of their bodies — counted at the real S3 server
(moto_server's request log) — and a run with nothing to do ends before Ray starts."""
from __future__ import annotations

import io
import json
import os
import tarfile
import time

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core import output, storage
from core.label_config import LabelConfig
from jobs.label import label
from tests.fixtures.images import jpeg_bytes, png_bytes

SMALL = dict(actors=1, cpus_per_actor=1, batch_size=4, rows_per_file=50, io_threads=2, progress=False)
KEY = ["uri", "member", "content_sha256", "model_id"]


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def bucket(moto_s3, tmp_path):
    name = f"incr-{os.getpid()}-{tmp_path.name[-12:]}".lower().replace("_", "-")
    moto_s3.make_bucket(name)
    client = moto_s3.client()
    for i in range(8):
        client.put_object(Bucket=name, Key=f"photos/p{i}.jpg", Body=jpeg_bytes(40 + i, 30))
    client.put_object(Bucket=name, Key="packs/pack.tar", Body=_tar({"a.jpg": jpeg_bytes(30, 30),
                                                                     "b.png": png_bytes(20, 20)}))
    return name


def _one_row_per_key(out: str) -> pd.DataFrame:
    fs, root = storage.get_filesystem(out)
    df = pd.read_parquet(root, filesystem=fs)
    assert not df.duplicated(KEY).any()
    return df


@pytest.mark.slow
def test_no_op_over_a_prefix_and_a_tar_on_s3_reads_no_body(ray_local, moto_s3, bucket, tiny_bundle):
    out = f"s3://{bucket}/labels"
    cfg = LabelConfig(inputs=(f"s3://{bucket}/photos/", f"s3://{bucket}/packs/pack.tar"), model=str(tiny_bundle),
                      out=out, **SMALL)
    first = label(cfg)
    assert first[output.M_IMAGES] == 10
    gets = len(moto_s3.object_gets(bucket))
    again = label(cfg)
    new_gets = [k for k in moto_s3.object_gets(bucket)[gets:] if not k.startswith("labels/")]
    assert new_gets == []  # not one photo, not the tar
    assert again[output.M_IMAGES] == 0 and again[output.M_SKIPPED] == 9  # 8 photos + 1 archive, unread
    assert again[output.M_CONFIG]["plan"] is None  # ended before Ray was asked for anything
    assert output.Output(out).last_run()[output.M_RUN_ID] == again[output.M_RUN_ID]
    assert len(output.Output(out).finished_runs()) == 1  # an empty run publishes no folder
    assert len(_one_row_per_key(out)) == 10


@pytest.mark.slow
def test_overwritten_objects_are_relabelled_and_only_they_are_read(ray_local, moto_s3, bucket, tiny_bundle):
    out = f"s3://{bucket}/labels"
    cfg = LabelConfig(inputs=(f"s3://{bucket}/photos/",), model=str(tiny_bundle), out=out, **SMALL)
    label(cfg)
    client = moto_s3.client()
    for i in (1, 4, 6):
        client.put_object(Bucket=bucket, Key=f"photos/p{i}.jpg", Body=jpeg_bytes(70 + i, 50))
    gets = len(moto_s3.object_gets(bucket))
    again = label(cfg)
    read = sorted(k for k in moto_s3.object_gets(bucket)[gets:] if k.startswith("photos/"))
    assert read == ["photos/p1.jpg", "photos/p4.jpg", "photos/p6.jpg"]
    assert again[output.M_IMAGES] == 3 and again[output.M_SKIPPED] == 5
    df = _one_row_per_key(out)  # new rows for the new content, the old rows stay
    assert len(df) == 11 and df.groupby("uri").size().max() == 2


@pytest.mark.slow
def test_a_new_version_in_a_versioned_bucket_is_relabelled(ray_local, moto_s3, bucket, tiny_bundle):
    client = moto_s3.client()
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    out = f"s3://{bucket}/labels"
    cfg = LabelConfig(inputs=(f"s3://{bucket}/photos/",), model=str(tiny_bundle), out=out, **SMALL)
    label(cfg)
    client.put_object(Bucket=bucket, Key="photos/p2.jpg", Body=jpeg_bytes(90, 60))
    again = label(cfg)
    assert again[output.M_IMAGES] == 1
    versions = _one_row_per_key(out).query("uri.str.endswith('p2.jpg')", engine="python")["version"]
    assert versions.nunique() == 2  # each row says which version of the object it labelled


def test_s3_inventory_manifests_as_s3_writes_them(ray_local, moto_s3, bucket, tiny_bundle, tmp_path):
    """A Parquet inventory data file and a CSV inventory report (manifest.json + gzip CSV, keys
    URL-encoded): rows with an ETag are skipped unread on the next run; delete markers and
    non-current versions are not labelled."""
    import gzip

    client = moto_s3.client()
    heads = {f"photos/p{i}.jpg": client.head_object(Bucket=bucket, Key=f"photos/p{i}.jpg") for i in range(8)}
    rows = [{"bucket": bucket, "key": k, "size": h["ContentLength"], "e_tag": h["ETag"].strip('"'),
             "is_latest": True, "is_delete_marker": False} for k, h in list(heads.items())[:4]]
    rows.append({"bucket": bucket, "key": "photos/old.jpg", "size": 1, "e_tag": "x", "is_latest": False,
                 "is_delete_marker": False})
    inventory = tmp_path / "inventory.parquet"
    pq.write_table(pa.Table.from_pylist(rows), inventory)
    client.put_object(Bucket=bucket, Key="photos/with space.jpg", Body=jpeg_bytes(33, 33))
    etag = client.head_object(Bucket=bucket, Key="photos/with space.jpg")["ETag"]
    client.put_object(Bucket=bucket, Key="photos/a+b c.jpg", Body=jpeg_bytes(34, 33))  # S3 writes it a%2Bb+c
    etag2 = client.head_object(Bucket=bucket, Key="photos/a+b c.jpg")["ETag"]
    lines = [f'"{bucket}","{k}","{h["ContentLength"]}","{h["ETag"].strip(chr(34))}"' for k, h in
             list(heads.items())[4:]] + [f'"{bucket}","photos/with%20space.jpg","1","{etag.strip(chr(34))}"',
                                         f'"{bucket}","photos/a%2Bb+c.jpg","1","{etag2.strip(chr(34))}"']
    client.put_object(Bucket=bucket, Key="inv/data/part0.csv.gz", Body=gzip.compress("\n".join(lines).encode()))
    spec = {"sourceBucket": bucket, "destinationBucket": f"arn:aws:s3:::{bucket}", "fileFormat": "CSV",
            "fileSchema": "Bucket, Key, Size, ETag", "files": [{"key": "inv/data/part0.csv.gz", "size": 1}]}
    client.put_object(Bucket=bucket, Key="inv/manifest.json", Body=json.dumps(spec).encode())

    out = f"s3://{bucket}/labels"
    cfg = LabelConfig(manifests=(str(inventory), f"s3://{bucket}/inv/manifest.json"), model=str(tiny_bundle),
                      out=out, **SMALL)
    first = label(cfg)
    assert first[output.M_IMAGES] == 10 and first[output.M_ERRORS] == 0  # "a+b c.jpg" was "not found"
    gets = len(moto_s3.object_gets(bucket))
    again = label(cfg)
    assert again[output.M_IMAGES] == 0 and again[output.M_SKIPPED] == 10
    assert [k for k in moto_s3.object_gets(bucket)[gets:] if k.startswith("photos/")] == []
    assert {f"s3://{bucket}/photos/with space.jpg", f"s3://{bucket}/photos/a+b c.jpg"} <= set(_one_row_per_key(out).uri)


@pytest.mark.slow
def test_touched_file_is_read_once_then_skipped_unread(ray_local, tmp_path, tiny_bundle):
    """Same bytes, new mtime: read and hashed once (no new row: its content is labelled), and the
    new version is remembered, so the run after that does not read it again."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        (folder / f"p{i}.jpg").write_bytes(jpeg_bytes(40 + i, 30))
    cfg = LabelConfig(inputs=(str(folder),), model=str(tiny_bundle), out=str(tmp_path / "out"), **SMALL)
    label(cfg)
    stamp = time.time() + 60
    os.utime(folder / "p1.jpg", (stamp, stamp))
    touched = label(cfg)
    assert touched[output.M_IMAGES] == 0 and touched[output.M_SKIPPED] == 3  # 2 from the listing, 1 by content
    assert touched[output.M_CONFIG]["plan"] is not None  # it had to read p1.jpg
    quiet = label(cfg)
    assert quiet[output.M_IMAGES] == 0 and quiet[output.M_CONFIG]["plan"] is None
    assert len(_one_row_per_key(str(tmp_path / "out"))) == 3


def test_an_archive_key_needs_the_archive_listed_whole_and_read_cleanly():
    """Rows of some members (a manifest naming them) must not mark the whole archive done, nor an
    archive one of whose members failed to read in a way a later run retries."""
    import pyarrow as pa

    from core import schema
    from core.skipset import KeyLog, archive_key, contains

    def rows(member: str, error: str | None = None) -> pa.Table:
        return pa.table({schema.URI: ["s3://b/a.tar"], schema.MEMBER: [member], schema.CONTENT_SHA256: ["0" * 64],
                         schema.MODEL_ID: ["m"], schema.VERSION: ["e1"], schema.ERROR: [error]})

    log = KeyLog()
    log.add_rows(rows("x.jpg"))
    key = archive_key("s3://b/a.tar", "e1", "m")
    assert not contains(log.skipset(whole_archives=set()).listing, key)  # named by a manifest only
    assert contains(log.skipset(whole_archives={"s3://b/a.tar"}).listing, key)
    log.add_rows(rows("y.jpg", error="cannot read: connection reset"))
    assert not contains(log.skipset(whole_archives={"s3://b/a.tar"}).listing, key)


def test_too_large_is_read_again_when_the_limit_is_raised(ray_local, tmp_path, tiny_bundle):
    """A row `too large` at --max-object-mb 0.01 counted as done: raising the limit said "nothing new
    to label" and the object was never labelled (only --relabel, of everything, got it). Now the
    same limit still skips it unread, and a larger one reads and labels it, for a folder and for
    a member of an archive."""
    folder = tmp_path / "photos"
    folder.mkdir()
    big = jpeg_bytes(400, 300, quality=100)
    assert len(big) > 12_000
    (folder / "big.jpg").write_bytes(big)
    (folder / "small.jpg").write_bytes(jpeg_bytes(20, 20))
    (folder / "pack.tar").write_bytes(_tar({"inner.jpg": big}))
    base = dict(inputs=(str(folder),), model=str(tiny_bundle), out=str(tmp_path / "out"), **SMALL)
    first = label(LabelConfig(**base, max_object_mb=0.01))
    assert first[output.M_ERRORS_BY_KIND] == {"too large": 2}
    same = label(LabelConfig(**base, max_object_mb=0.01))
    assert same[output.M_IMAGES] == 0 and same[output.M_CONFIG]["plan"] is None  # unread, before Ray
    raised = label(LabelConfig(**base))
    assert raised[output.M_IMAGES] == 2 and raised[output.M_ERRORS] == 0
    rows = output.Output(str(tmp_path / "out")).read_finished().to_pandas()
    labelled = rows[rows.error.isna()]
    assert sorted(labelled.member.fillna("").map(str)) == ["", "", "inner.jpg"]


def test_a_file_not_found_that_turns_up_empty_gets_its_own_row(ray_local, tmp_path, tiny_bundle):
    """A manifest line "not found" had the content key of no bytes, sha256(b""): when the file
    then turned up with 0 bytes, the run took it for labelled ("already done"), and the output
    said "not found" for a file that exists. A failed read's row has content_sha256 "" now, and
    a "not found" row written before that (with the empty hash) is read the same way."""
    from core import schema

    (tmp_path / "a.jpg").write_bytes(jpeg_bytes(30, 30))
    manifest = tmp_path / "m.txt"
    manifest.write_text("a.jpg\nlater.jpg\n")
    cfg = LabelConfig(inputs=(), manifests=(str(manifest),), model=str(tiny_bundle), out=str(tmp_path / "out"),
                      **SMALL)
    first = label(cfg)
    assert first[output.M_ERRORS_BY_KIND] == {"not found": 1}
    rows = output.Output(str(tmp_path / "out")).read_finished().to_pandas()
    assert rows.set_index("error").loc["not found", "content_sha256"] == schema.UNREAD_SHA256
    (tmp_path / "later.jpg").write_bytes(b"")
    again = label(cfg)
    assert again[output.M_ERRORS_BY_KIND] == {"empty file": 1}
    rows = _one_row_per_key(str(tmp_path / "out"))
    assert sorted(rows.error.dropna()) == ["empty file", "not found"]


def test_a_failed_read_written_with_the_empty_hash_is_still_one_key():
    """Outputs written before UNREAD_SHA256 gave a failed read sha256(b""): its content key is the
    unread one, so failing again adds no second row, and an empty file is not taken for it."""
    import hashlib

    from core import schema
    from core.skipset import KeyLog, content_key, contains

    empty = hashlib.sha256(b"").hexdigest()
    log = KeyLog()
    log.add_rows(pa.table({schema.URI: ["/p/x.jpg"], schema.MEMBER: pa.array([None], pa.string()),
                           schema.CONTENT_SHA256: [empty], schema.MODEL_ID: ["m"], schema.VERSION: [None],
                           schema.ERROR: ["not found"]}))
    keys = log.skipset().content
    assert contains(keys, content_key("/p/x.jpg", None, schema.UNREAD_SHA256, "m"))
    assert not contains(keys, content_key("/p/x.jpg", None, empty, "m"))
