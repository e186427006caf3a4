"""A bad day and a hostile user: a dead or frozen S3 endpoint fails the run (never rows of
"cannot read"), a bad object fails its row, nothing vanishes, memory stays bounded.

Each run is the real `python -m jobs.label` in a process of its own; the S3 here is a
moto_server of this module's own (so freezing it cannot disturb other tests) behind a TCP
forwarder that can be taken down and brought back."""
from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import tarfile
import time
import zipfile
from pathlib import Path

import boto3
import pandas as pd
import pytest

from core import output, storage
from core.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, JobError
from tests.fixtures.crash import REPO, Point, job_env, label_command
from tests.fixtures.images import jpeg_bytes
from tests.fixtures.proxy import TcpProxy
from tests.fixtures.s3 import aws_test_env, start_moto_server
from tests.fixtures.waiting import stop_process

N = 24
RUN_TIMEOUT_S = 300
FAST_FAIL = ["--io-timeout", "2", "--io-attempts", "2"]  # a dead endpoint fails the run in seconds


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """This module's own moto_server, reached through a TcpProxy; the data bucket filled."""
    proc, url = start_moto_server(tmp_path_factory.mktemp("faults-moto") / "requests.log")
    port = int(url.rsplit(":", 1)[1])
    proxy = TcpProxy("127.0.0.1", port)
    client = boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing")
    client.create_bucket(Bucket="faults")
    for i in range(N):
        client.put_object(Bucket="faults", Key=f"photos/p{i:02d}.jpg", Body=jpeg_bytes(40 + i, 30))
    try:
        with pytest.MonkeyPatch.context() as mp:  # this process reads the outputs through the proxy too
            for name, value in aws_test_env(proxy.url).items():
                mp.setenv(name, value)
            yield proc, proxy, client
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proxy.down()
        stop_process(proc)


def _args(out: str, bundle: Path, *extra: str, inputs=("s3://faults/photos/",)) -> list[str]:
    return [*inputs, "--model", str(bundle), "--out", out, "--batch-size", "2", "--stage-every", "0",
            "--actors", "1", "--cpus-per-actor", "1", "--io-threads", "1", "--no-progress", *extra]


def _env(proxy: TcpProxy) -> dict:
    return job_env(aws_test_env(proxy.url))


def _run(cmd: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=env or job_env(), capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S)


def _paused(cmd: list[str], env: dict, marker: Path) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.1)
    return proc


def _rows(out: str) -> pd.DataFrame:
    fs, root = storage.get_filesystem(out)
    return pd.read_parquet(root, filesystem=fs)


@pytest.mark.parametrize("outage", ["dead", "frozen"])
@pytest.mark.slow
def test_an_endpoint_outage_fails_the_run_and_a_rerun_recovers(outage, s3, tiny_bundle, tmp_path):
    """The run pauses after staging its first rows; the endpoint dies (connections refused) or
    freezes (SIGSTOP: accepted, never answered); the run goes on and must fail within its
    timeouts: exit 1, one line naming the endpoint, nothing published. Then it recovers."""
    proc, proxy, _ = s3
    out, marker, go = str(tmp_path / "labels"), tmp_path / "paused", tmp_path / "go"
    cmd = label_command(_args(out, tiny_bundle, *FAST_FAIL), Point("core.output:Output.write_part", action="pause"),
                        marker=marker, release=go)
    run = _paused(cmd, _env(proxy), marker)
    if outage == "dead":
        proxy.down()
    else:
        os.kill(proc.pid, signal.SIGSTOP)
    try:
        released = time.monotonic()
        go.touch()
        _, err = run.communicate(timeout=RUN_TIMEOUT_S)
        took = time.monotonic() - released
    finally:
        proxy.up() if outage == "dead" else os.kill(proc.pid, signal.SIGCONT)
    assert run.returncode == EXIT_FAILED, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("breedlabel label: error: s3://faults/photos/") and proxy.url in last, last
    assert "does not answer" in last and "Traceback" not in err
    assert took < 120  # 2 attempts of 2 s per request, a few requests in flight: bounded, not 8 minutes
    assert output.Output(out).finished_runs() == [] and output.Output(out).staged_runs()

    again = _run(label_command(_args(out, tiny_bundle, *FAST_FAIL)), _env(proxy))
    assert again.returncode == EXIT_OK, again.stderr[-3000:]
    df = _rows(out)
    assert sorted(df.uri) == [f"s3://faults/photos/p{i:02d}.jpg" for i in range(N)]  # each exactly once
    assert df.error.isna().all()  # no "cannot read" row for an object that exists


@pytest.mark.slow
def test_an_outage_of_an_s3_output_is_one_line_too(s3, tiny_bundle, tmp_path):
    _, proxy, client = s3
    client.create_bucket(Bucket="faults-out")
    out, marker, go = "s3://faults-out/labels", tmp_path / "paused", tmp_path / "go"
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(6):
        (photos / f"p{i}.jpg").write_bytes(jpeg_bytes(40 + i, 30))
    cmd = label_command(_args(out, tiny_bundle, *FAST_FAIL, inputs=(str(photos),)),
                        Point("core.output:Output.write_part", action="pause"), marker=marker, release=go)
    run = _paused(cmd, _env(proxy), marker)
    proxy.down()
    try:
        go.touch()
        _, err = run.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        proxy.up()
    assert run.returncode == EXIT_FAILED, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith("breedlabel label: error: s3://")
    assert f"http://127.0.0.1:{proxy.port} does not answer (" in last and "permissions" not in last, last
    again = _run(label_command(_args(out, tiny_bundle, *FAST_FAIL, inputs=(str(photos),))), _env(proxy))
    assert again.returncode == EXIT_OK, again.stderr[-3000:]
    assert sorted(_rows(out).uri) == sorted(str(p) for p in photos.iterdir())


@pytest.mark.slow
def test_a_name_that_is_not_utf8_is_labelled_and_kept_losslessly(tiny_bundle, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    raw = os.fsencode(str(photos)) + b"/caf\xe9.jpg"
    with open(raw, "wb") as f:
        f.write(jpeg_bytes(40, 30))
    (photos / "ok.jpg").write_bytes(jpeg_bytes(41, 30))
    out = str(tmp_path / "labels")
    done = _run(label_command(_args(out, tiny_bundle, "--address", "local", inputs=(str(photos),))))
    assert done.returncode == EXIT_OK, done.stderr[-3000:]
    df = _rows(out)
    assert len(df) == 2 and df.error.isna().all()
    (escaped,) = [u for u in df.uri if "caf" in u]
    assert escaped.startswith("file://") and escaped.endswith("caf%E9.jpg")
    assert os.fsencode(storage.parse_uri(escaped).path) == raw  # the bytes of the name, back exactly


def _zip_of_zeros(path: Path, members: dict[str, int]) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, size in members.items():
            zf.writestr(name, bytes(size))


def _peak_tree_memory(cmd: list[str]) -> tuple[int, subprocess.CompletedProcess]:
    """Peak memory of the job's whole process tree, as the sum of PSS (each shared page counted
    once: RSS would count the Ray object store once per worker that maps it)."""
    import psutil

    proc = subprocess.Popen(cmd, cwd=REPO, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        try:
            tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
            peak = max(peak, sum(p.memory_full_info().pss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    out, err = proc.communicate()
    return peak, subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.slow
def test_a_zip_of_big_members_keeps_memory_bounded(tiny_bundle, tmp_path):
    """1.4 MB of zip: 30 members of 48 MiB of zeros (read, one chunk at a time: not images) and
    2 of 100 MiB (over --max-object-mb 64: error rows, never read). The job tree's peak memory
    stays within 1.5 GB of the same job on a 3-member zip."""
    small, bomb = tmp_path / "small.zip", tmp_path / "bomb.zip"
    _zip_of_zeros(small, {f"s{i}.jpg": 1000 for i in range(3)})
    _zip_of_zeros(bomb, {**{f"z{i:02d}.jpg": 48 << 20 for i in range(30)}, "big0.jpg": 100 << 20,
                         "big1.jpg": 100 << 20})
    assert bomb.stat().st_size < 2 << 20
    base, done = _peak_tree_memory(label_command(_args(str(tmp_path / "o1"), tiny_bundle, "--address", "local",
                                                    inputs=(str(small),))))
    assert done.returncode == EXIT_OK, done.stderr[-3000:]
    peak, done = _peak_tree_memory(label_command(_args(str(tmp_path / "o2"), tiny_bundle, "--address", "local",
                                                    inputs=(str(bomb),))))
    assert done.returncode == EXIT_OK, done.stderr[-3000:]
    errors = _rows(str(tmp_path / "o2")).set_index("member").error
    assert len(errors) == 32 and errors["big0.jpg"] == "too large" and errors["z00.jpg"] == "not an image"
    assert peak - base < 1.5 * 2**30, f"peak {peak / 2**20:.0f} MiB, baseline {base / 2**20:.0f} MiB"


def _tar_with_links(path: Path) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in (("a.jpg", jpeg_bytes(40, 30)), ("inner.zip", b"PK\x05\x06" + bytes(18)),
                           ("notes.txt", b"not an image, not listed")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, kind in (("soft.jpg", tarfile.SYMTYPE), ("hard.jpg", tarfile.LNKTYPE)):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "a.jpg"
            tf.addfile(info)


@pytest.mark.slow
def test_every_member_and_object_gets_its_row(ray_local, tiny_bundle, tmp_path):
    """Links and nested archives in a tar, an archive with no image, duplicate manifest lines,
    the same folder twice, an http:// line: rows out = objects in, each once."""
    from core.label_config import LabelConfig
    from jobs.label import label

    tar, empty = tmp_path / "links.tar", tmp_path / "empty.tar"
    _tar_with_links(tar)
    with tarfile.open(empty, "w") as tf:
        info = tarfile.TarInfo("readme.txt")
        tf.addfile(info, io.BytesIO(b""))
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        (photos / f"p{i}.jpg").write_bytes(jpeg_bytes(40 + i, 30))
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"{photos}/p0.jpg\n{photos}/p0.jpg\nhttps://example.com/dog.jpg\n")
    out = str(tmp_path / "labels")
    cfg = LabelConfig(inputs=(str(tar), str(empty), str(photos), str(photos)), manifests=(str(manifest),),
                      model=str(tiny_bundle), out=out, actors=1, cpus_per_actor=1, batch_size=4, progress=False)
    m = label(cfg)
    df = _rows(out)
    df = df.astype(object).where(df.notna(), None)
    got = {(os.path.basename(u), mem): err for u, mem, err in zip(df.uri, df.member, df.error)}
    assert got == {("links.tar", "a.jpg"): None, ("links.tar", "soft.jpg"): "link member (not followed)",
                   ("links.tar", "hard.jpg"): "link member (not followed)",
                   ("links.tar", "inner.zip"): "nested archive (not expanded)",
                   ("empty.tar", None): "no images in archive",
                   ("p0.jpg", None): None, ("p1.jpg", None): None, ("p2.jpg", None): None,
                   ("dog.jpg", None): "unsupported URI scheme"}
    assert m[output.M_IMAGES] == len(df) == 9


def test_symlinked_directories_are_not_followed_and_loops_never(ray_local, tiny_bundle, tmp_path):
    from core.label_config import LabelConfig
    from jobs.label import label

    month = tmp_path / "photos" / "2024-06"
    month.mkdir(parents=True)
    for i in range(2):
        (month / f"p{i}.jpg").write_bytes(jpeg_bytes(40 + i, 30))
    (tmp_path / "photos" / "latest").symlink_to(month, target_is_directory=True)
    (month / "loop").symlink_to(tmp_path / "photos", target_is_directory=True)
    for follow in (False, True):
        out = str(tmp_path / f"labels-{follow}")
        label(LabelConfig(inputs=(str(tmp_path / "photos"),), model=str(tiny_bundle), out=out, actors=1,
                          cpus_per_actor=1, progress=False, follow_symlinks=follow))
        assert sorted(_rows(out).uri) == [str(month / "p0.jpg"), str(month / "p1.jpg")]
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "x.jpg").write_bytes(jpeg_bytes(33, 33))
    (month / "more").symlink_to(other, target_is_directory=True)
    listed = {os.path.basename(i.uri) for i in storage.list_files(str(tmp_path / "photos"), follow_symlinks=True)}
    assert listed == {"p0.jpg", "p1.jpg", "x.jpg"}  # followed when asked, once
    assert {os.path.basename(i.uri) for i in storage.list_files(str(tmp_path / "photos"))} == {"p0.jpg", "p1.jpg"}


def test_usage_and_output_problems_are_one_line(tiny_bundle, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "p.jpg").write_bytes(jpeg_bytes(40, 30))
    (photos / "two\nlines.jpg").write_bytes(jpeg_bytes(41, 30))
    top = _run(label_command([str(photos), "--model", str(tiny_bundle), "--out", str(tmp_path / "o"),
                              "--top-k", "50"]))
    assert top.returncode == EXIT_USAGE and "--top-k 50" in top.stderr and "4 classes" in top.stderr
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    bad_out = _run(label_command([str(photos), "--model", str(tiny_bundle), "--out", str(blocked / "labels")]))
    assert bad_out.returncode == EXIT_FAILED and "Traceback" not in bad_out.stderr, bad_out.stderr[-2000:]
    assert bad_out.stderr.strip().splitlines()[-1].startswith(f"breedlabel label: error: {blocked}")
    # an output folder holding other files was written into, and then no reader could read it back
    crowded = tmp_path / "crowded"
    crowded.mkdir()
    for name in ("notes.txt", "old.jpg", "_ignored", ".hidden"):
        (crowded / name).write_text("x")
    busy = _run(label_command([str(photos), "--model", str(tiny_bundle), "--out", str(crowded)]))
    assert busy.returncode == EXIT_FAILED, busy.stderr[-2000:]
    assert busy.stderr.strip().splitlines()[-1] == (
        f"breedlabel label: error: {crowded}: the output folder holds 2 entries no label run wrote (notes.txt, "
        "old.jpg), on which readers of the folder (pandas, pyarrow, DuckDB) fail; give a new or empty folder, or "
        "move them out")
    assert sorted(p.name for p in crowded.iterdir()) == [".hidden", "_ignored", "notes.txt", "old.jpg"]
    dry = _run(label_command([str(photos), "--model", str(tiny_bundle), "--dry-run"]))
    assert dry.returncode == EXIT_OK and sorted(dry.stdout.splitlines()) == [
        str(photos / "p.jpg"), str(photos) + "/two\\nlines.jpg"]  # one line an item, the newline escaped


def test_an_edited_bundle_is_refused_before_anything_runs(tiny_bundle, tmp_path):
    import json
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    labels = json.loads((bundle / "labels.json").read_text())
    labels[0]["name"], labels[1]["name"] = labels[1]["name"], labels[0]["name"]
    (bundle / "labels.json").write_text(json.dumps(labels))
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "p.jpg").write_bytes(jpeg_bytes(40, 30))
    refused = _run(label_command([str(photos), "--model", str(bundle), "--out", str(tmp_path / "o")]))
    assert refused.returncode == EXIT_FAILED and "labels.json was changed" in refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "o").exists()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_cluster_address_where_nothing_listens_fails_in_seconds(tiny_bundle, tmp_path):
    """`ray.init` retried it for minutes, silent (the label job is quiet) and deaf to Ctrl-C."""
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "p.jpg").write_bytes(jpeg_bytes(40, 30))
    address = f"127.0.0.1:{_closed_port()}"
    args = [str(tmp_path / "photos"), "--model", str(tiny_bundle), "--out", str(tmp_path / "o")]
    given = _run(label_command([*args, "--address", address]))
    from_env = _run(label_command(args), env=job_env({"RAY_ADDRESS": address}))
    for done, name in ((given, "--address"), (from_env, "RAY_ADDRESS")):
        assert done.returncode == EXIT_FAILED and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert done.stderr.strip().splitlines()[-1].startswith(
            f"breedlabel label: error: {name} {address}: no Ray cluster answers there (Connection refused")
    assert not storage.exists(f"{tmp_path}/o/_lease.json")


def test_only_host_port_addresses_are_probed():
    from cluster.address import check_reachable

    check_reachable("auto")  # Ray finds the address itself
    with pytest.raises(JobError, match=r"RAY_ADDRESS ray://127\.0\.0\.1:\d+: no Ray cluster answers there"):
        check_reachable(f"ray://127.0.0.1:{_closed_port()}", "RAY_ADDRESS", timeout_s=1, attempts=1)



def test_an_address_where_something_else_listens_fails_in_seconds(ray_local):
    """A port that accepts TCP but is not Ray (an SSH or web server, the dashboard's port given as the
    GCS) made `ray.init` hang ~2 minutes; a Ray GCS passes the probe."""
    import ray

    from cluster.address import check_reachable

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        with pytest.raises(JobError, match=r"--address 127\.0\.0\.1:\d+: something listens there, but not a Ray "
                                           r"cluster \(no gRPC answer in 1 s\)"):
            check_reachable(f"127.0.0.1:{listening.getsockname()[1]}", timeout_s=1)
    check_reachable(ray.get_runtime_context().gcs_address, timeout_s=5)
