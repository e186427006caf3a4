"""core.storage against the local filesystem and a real S3 endpoint (moto_server over HTTP)."""
from __future__ import annotations

import itertools
import os
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core import s3, storage
from core.errors import ServiceError, StorageError
from core.storage import ObjectNotFoundError, S3Options


@pytest.fixture
def bucket(moto_s3) -> str:
    return moto_s3.make_bucket(f"test-{uuid.uuid4().hex[:12]}")


@pytest.fixture(params=["local", "file", "s3"])
def root(request, tmp_path) -> str:
    """The same tests over a plain path, a file:// URI and an S3 prefix."""
    if request.param == "s3":
        return request.getfixturevalue("bucket") + "/root"
    if request.param == "file":
        return f"file://{tmp_path}"
    return str(tmp_path)


def test_parse_uri():
    assert storage.parse_uri("s3://b/k/x.jpg") == storage.ParsedURI("s3", "b", "k/x.jpg")
    assert storage.parse_uri("s3://b/k/a#b?c=1.jpg") == storage.ParsedURI("s3", "b", "k/a#b?c=1.jpg")
    assert storage.parse_uri("file:///tmp/a%20b.jpg") == storage.ParsedURI("file", "", "/tmp/a b.jpg")
    assert storage.parse_uri("file:/tmp/a%20b.jpg") == storage.ParsedURI("file", "", "/tmp/a b.jpg")  # RFC 8089
    assert storage.parse_uri("rel/x.jpg") == storage.ParsedURI("file", "", "rel/x.jpg")
    for bad in ("", "gs://b/k", "https://host/x", "s3:///key"):
        with pytest.raises(StorageError):
            storage.parse_uri(bad)


def test_join_keeps_style():
    assert storage.join("s3://b/p/", "a/", "/x.jpg") == "s3://b/p/a/x.jpg"
    assert storage.join("file:///t", "a", "x") == "file:///t/a/x"
    assert storage.join("/t", "a", "x") == os.path.join("/t", "a", "x")


def test_round_trip(root):
    uri = storage.join(root, "dir", "a.bin")
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"hello world")
    assert storage.exists(uri)
    assert storage.read_bytes(uri) == b"hello world"
    assert storage.read_range(uri, 6, 100) == b"world"
    assert storage.stat(uri).size == 11
    with storage.open_input(uri) as f:
        f.seek(-5, os.SEEK_END)
        assert f.read() == b"world"
    storage.delete(uri)
    assert not storage.exists(uri)
    with pytest.raises(ObjectNotFoundError, match="not found"):
        storage.read_bytes(uri)
    with pytest.raises(ObjectNotFoundError):
        storage.delete(uri, missing_ok=False)


def test_copy_rename_delete_tree(root):
    src, dst = storage.join(root, "_staging", "p.bin"), storage.join(root, "out", "p.bin")
    storage.write_bytes(src, b"part")
    storage.copy(src, storage.join(root, "copy.bin"))
    storage.rename(src, dst)
    assert not storage.exists(src) and storage.read_bytes(dst) == b"part"
    assert storage.read_bytes(storage.join(root, "copy.bin")) == b"part"
    storage.delete_tree(storage.join(root, "out"))
    assert not storage.exists(dst)


def test_local_write_is_atomic_and_leaves_no_temp(tmp_path):
    target = tmp_path / "x.json"
    storage.write_bytes(str(target), b"1")
    storage.write_bytes(str(target), b"2")
    assert target.read_bytes() == b"2"
    assert os.listdir(tmp_path) == ["x.json"]
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    # the mode a plain open() gives (mkstemp's 0600 stayed: a review file Label Studio could not read)
    assert target.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def test_cross_scheme_copy(tmp_path, bucket):
    local = str(tmp_path / "a.bin")
    storage.write_bytes(local, b"abc")
    storage.copy(local, f"{bucket}/a.bin")
    storage.copy(f"{bucket}/a.bin", str(tmp_path / "b.bin"))
    assert (tmp_path / "b.bin").read_bytes() == b"abc"


def test_list_extensions_and_order(root):
    for name in ("b/2.JPG", "a/1.png", "a/0.jpeg", "c.txt", "blob", "z.webp"):
        storage.write_bytes(storage.join(root, name), b"x" * 3)
    names = [i.uri[len(root):].lstrip("/") for i in storage.list_files(root)]
    assert names == ["a/0.jpeg", "a/1.png", "b/2.JPG", "z.webp"]
    every = [i.uri[len(root):].lstrip("/") for i in storage.list_files(root, extensions=None)]
    assert every == ["a/0.jpeg", "a/1.png", "b/2.JPG", "blob", "c.txt", "z.webp"]
    assert all(i.size == 3 for i in storage.list_files(root, extensions=None))
    (png,) = storage.list_files(storage.join(root, "a"), extensions=("png",))
    assert (png.uri, png.size) == (storage.join(root, "a", "1.png"), 3)
    assert png.version == storage.stat(png.uri).version  # ETag, or mtime:size, the same from a listing or a stat
    storage.write_bytes(png.uri, b"y" * 4)
    assert storage.stat(png.uri).version != png.version  # new bytes, new version


def test_s3_listing_streams_page_by_page(moto_s3, bucket, monkeypatch):
    client = moto_s3.client()
    name = storage.parse_uri(bucket).bucket
    for i in range(210):  # 3 pages of 100: enough to prove pagination, cheap on 2 cores
        client.put_object(Bucket=name, Key=f"many/{i:05d}.jpg", Body=b"")
    calls = []
    real = storage.s3_client(None)
    orig = real._make_api_call

    def counting(op, params):
        calls.append((op, params.get("MaxKeys")))
        return orig(op, params)

    monkeypatch.setattr(real, "_make_api_call", counting)
    stream = storage.list_files(f"{bucket}/many", page_size=100)
    first = list(itertools.islice(stream, 10))
    assert calls == [("ListObjectsV2", 100)]  # work can start after one page
    rest = list(stream)
    assert [c[0] for c in calls] == ["ListObjectsV2"] * 3
    keys = [i.uri for i in first + rest]
    assert len(keys) == 210 and keys == sorted(keys)


def test_s3_errors_are_clear(moto_s3, tmp_path):
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-here' does not exist"):
        list(storage.list_files("s3://no-such-bucket-here/x"))
    with pytest.raises(StorageError, match="no such file or directory"):
        list(storage.list_files(str(tmp_path / "missing")))
    dead = S3Options(endpoint_url="http://127.0.0.1:9", max_attempts=2)
    with pytest.raises(ServiceError, match="the S3 endpoint http://127.0.0.1:9 does not answer"):
        storage.read_bytes("s3://b/k", s3=dead)  # a service problem: the run fails, never a row error


def test_an_unreachable_endpoint_is_named_whichever_it_is(monkeypatch):
    """The message reads the same for a set endpoint and for AWS's default one (it said "the S3
    endpoint the AWS default endpoint"), and an output listed over pyarrow says it as boto3 does."""
    from core.output import Output

    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    assert S3Options().endpoint == "AWS's default S3 endpoint"
    assert S3Options(endpoint_url="http://127.0.0.1:9").endpoint == "the S3 endpoint http://127.0.0.1:9"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    with pytest.raises(ServiceError, match=r"^s3://b/out: the S3 endpoint http://127.0.0.1:9 does not answer \(list") \
            as err:
        Output("s3://b/out").finished_runs()
    assert "curlCode" not in str(err.value) and "Details" not in str(err.value)  # the AWS SDK's words, gist only
    assert str(err.value).endswith("check AWS_ENDPOINT_URL and the network, then rerun")
    with pytest.raises(ServiceError, match=r"does not answer \(read run metadata") as err:
        Output("s3://b/out").last_run()  # was "cannot read run metadata (…); remove it if it is damaged"
    assert "damaged" not in str(err.value)


def test_s3_no_credentials(moto_s3, monkeypatch):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var)
    opts = S3Options(region="eu-west-3")  # a fresh client: the cached one holds credentials
    with pytest.raises(StorageError, match="no AWS credentials found") as err:
        storage.read_bytes("s3://b/k", s3=opts)
    assert "testing" not in str(err.value)


def test_parquet_via_get_filesystem(bucket):
    fs, path = storage.get_filesystem(f"{bucket}/ds/part-0.parquet")
    table = pa.table({"uri": ["a", "b"], "prob": pa.array([0.5, 0.25], pa.float32())})
    pq.write_table(table, path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs).equals(table)
    assert [i.uri for i in storage.list_files(f"{bucket}/ds", extensions=(".parquet",))] == [
        f"{bucket}/ds/part-0.parquet"
    ]


def test_s3_seekable_reader_large_object(bucket, monkeypatch):
    """Above the whole-read size: buffered range reads, with the tail fetched once."""
    monkeypatch.setattr(storage, "_WHOLE_READ_MAX", 1000)
    monkeypatch.setattr(s3, "TAIL_BYTES", 3000)
    data = bytes(range(256)) * 40  # 10,240 bytes
    uri = f"{bucket}/big.bin"
    storage.write_bytes(uri, data)
    with storage.open_input(uri) as f:
        f.seek(-10, os.SEEK_END)
        assert f.read() == data[-10:]
        f.seek(-3500, os.SEEK_END)
        assert f.read(1000) == data[-3500:-2500]
        f.seek(5)
        assert f.read(7) == data[5:12]
        f.seek(0)
        assert f.read() == data


def test_read_bytes_never_opens_what_is_not_a_regular_file(tmp_path):
    """A named pipe in a manifest (or given to predict) blocked the run forever: opening one waits
    for a writer. A pipe, a device (/dev/zero says size 0 and never ends) and a folder are each
    "not a regular file", at once, and the limit still holds for files."""
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    for path, kind in ((fifo, "a pipe"), ("/dev/zero", "a device"), (tmp_path, "a directory")):
        with pytest.raises(s3.NotAFileError, match=f"not a regular file \\({kind}\\)") as info:
            storage.read_bytes(str(path), max_bytes=1000)
        assert info.value.reason == "not a regular file"
    with pytest.raises(s3.NotAFileError):
        storage.open_input(str(fifo))
    with pytest.raises(StorageError, match="not a regular file or a folder"):
        list(storage.list_files(str(fifo)))
    from core import labelling, reasons

    got = labelling.fetch([str(fifo), str(tmp_path)], [None, None])  # manifest lines: a row each, not retried
    assert got.errors == ["not a regular file"] * 2 and not reasons.is_retried(got.errors[0])
    small = tmp_path / "small.jpg"
    small.write_bytes(b"x" * 1000)
    assert storage.read_bytes(str(small), max_bytes=1000) == b"x" * 1000
    with pytest.raises(s3.ObjectTooLargeError, match="1,001 bytes, over the 1,000-byte limit"):
        small.write_bytes(b"x" * 1001)
        storage.read_bytes(str(small), max_bytes=1000)


def test_a_write_where_no_folder_can_be_made_says_so():
    with pytest.raises(StorageError, match="cannot write there") as info:
        storage.write_bytes("/proc/no-such-dir/x.json", b"{}")
    assert not isinstance(info.value, ObjectNotFoundError)  # not "deleted since listing"


def test_an_unreachable_endpoint_names_the_setting_to_check(monkeypatch):
    """"Check AWS_ENDPOINT_URL" only where that variable chose the endpoint; AWS's own endpoint
    points at the network (it said to check a variable nobody had set)."""
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    assert S3Options().endpoint_check.startswith("check the network")
    assert S3Options(endpoint_url="http://h:1").endpoint_check == "check the endpoint URL and the network"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://h:2")
    assert S3Options().endpoint_check == "check AWS_ENDPOINT_URL_S3 and the network"
    assert S3Options().resolved().endpoint_check == "check AWS_ENDPOINT_URL_S3 and the network"


def test_a_key_that_begins_with_a_slash_is_read_as_listed(bucket, moto_s3):
    """`/lead.jpg` was listed as s3://B//lead.jpg, then read as `lead.jpg`: "not found" on every run."""
    name = bucket.removeprefix("s3://")
    moto_s3.client().put_object(Bucket=name, Key="/lead.jpg", Body=b"lead")
    (uri,) = [f.uri for f in storage.list_files(f"{bucket}/")]
    assert uri == f"{bucket}//lead.jpg" and storage.read_bytes(uri) == b"lead"
