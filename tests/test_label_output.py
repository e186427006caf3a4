"""Label output without Ray: the schema, staging/publish, retried writes, recovery, readers,
the incremental key-set, the manifest and the exit codes it drives."""
from __future__ import annotations

import json
import os

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from core import output, schema, skipset
from core.errors import EXIT_ERROR_BUDGET, EXIT_FAILED, EXIT_OK
from core.label_summary import RunStats, build_manifest, exit_code, summary_text

CLASS_IDS = ["n1", "n2", "n3"]
CLASS_NAMES = ["Alpha", "Beta", "Gamma"]


def rows(n: int, model_id: str = "M", errors_every: int = 0, prefix: str = "img") -> pa.Table:
    labelled = np.array([not (errors_every and i % errors_every == 0) for i in range(n)])
    probs = np.tile(np.array([[0.2, 0.7, 0.1]], np.float32), (int(labelled.sum()), 1))
    return schema.build_table(
        uris=[f"/data/{prefix}{i}.jpg" for i in range(n)], members=[None] * n, sizes=list(range(n)),
        sha256s=[f"sha{prefix}{i}" for i in range(n)], widths=[10] * n, heights=[20] * n, probs=probs,
        labelled=labelled, errors=[None if ok else "not an image" for ok in labelled],
        class_ids=CLASS_IDS, class_names=CLASS_NAMES, model_id=model_id, k=2)


def test_schema_is_design_md():
    s = schema.LABEL_SCHEMA
    assert s.names == ["uri", "member", "bytes", "content_sha256", "width", "height", "top_k", "breed", "prob",
                       "error", "model_id", "run_id", "labelled_at", "dog_score", "is_dog", "version"]
    assert schema.FILE_SCHEMA.names == [n for n in s.names if n != "run_id"]  # the partition key is the folder
    assert s.field("bytes").type == pa.int64() and s.field("width").type == pa.int32()
    assert s.field("prob").type == pa.float32() and s.field("labelled_at").type == pa.timestamp("us", tz="UTC")
    entry = s.field("top_k").type.value_type
    assert [f.name for f in entry] == ["breed_id", "breed", "prob"] and entry.field("prob").type == pa.float32()
    assert s.field("run_id").type == pa.string() and s.field("is_dog").type == pa.bool_()
    for nullable in ("member", "width", "height", "breed", "prob", "error", "dog_score", "is_dog", "version"):
        assert s.field(nullable).nullable


def test_build_table_sorted_topk_and_error_rows():
    t = rows(4, errors_every=2)
    got = t.to_pylist()
    assert got[0]["error"] == "not an image" and got[0]["top_k"] == [] and got[0]["breed"] is None
    assert got[0]["width"] == 10 or got[0]["width"] is None  # widths are the caller's choice
    assert got[1]["breed"] == "Beta" and [e["breed_id"] for e in got[1]["top_k"]] == ["n2", "n1"]
    assert got[1]["prob"] == pytest.approx(0.7)
    assert t.schema.equals(schema.FILE_SCHEMA)


def test_staged_parts_are_invisible_until_commit(tmp_path):
    out = output.Output(str(tmp_path))
    writer = output.PartWriter(out, "R1", attempt=0, rows_per_file=4)
    writer.add(rows(10))
    writer.flush()
    assert [os.path.basename(f) for f in writer.files] == ["part-00-000000.parquet", "part-00-000001.parquet",
                                                           "part-00-000002.parquet"]
    assert ds.dataset(str(tmp_path), format="parquet").count_rows() == 0  # _staging is skipped
    assert out.finished_runs() == []
    out.commit("R1", {output.M_RUN_ID: "R1", output.M_STATUS: output.STATUS_COMPLETE, output.M_MODEL_ID: "M"})
    manifest = json.loads((tmp_path / "run_id=R1" / output.MANIFEST_FILE).read_text())
    assert len(manifest[output.M_FILES]) == 3
    assert not (tmp_path / "_staging").exists()  # no empty folder left behind
    out.write_json(out.staging("R2", "_run.json"), {})  # a run stopped before staging a row: no folder left
    out.discard_staged("R2")
    assert not (tmp_path / "_staging").exists()
    assert out.read_finished().column("run_id").to_pylist() == ["R1"] * 10


def test_every_common_reader_reads_the_folder(tmp_path):
    """pandas, pyarrow (dataset with and without hive partitioning, read_table) and DuckDB: two
    finished runs, one staged: 10 + 5 rows, `run_id` from the folder wherever the reader takes it."""
    out = output.Output(str(tmp_path))
    for run_id, n in (("R1", 10), ("R2", 5)):
        out.write_part(run_id, output.part_name(0, 0), rows(n, prefix=run_id))
        out.commit(run_id, {output.M_RUN_ID: run_id, output.M_STATUS: output.STATUS_COMPLETE, output.M_MODEL_ID: "M"})
    out.write_part("R3", output.part_name(0, 0), rows(7, prefix="R3"))  # staged, never committed
    expected = {"R1": 10, "R2": 5}
    counts = lambda runs: dict(pd.Series(runs).astype(str).value_counts())  # noqa: E731
    assert counts(pd.read_parquet(tmp_path)["run_id"]) == expected
    assert counts(ds.dataset(str(tmp_path), partitioning="hive").to_table().column("run_id").to_pylist()) == expected
    assert ds.dataset(str(tmp_path), format="parquet").count_rows() == 15
    assert counts(pq.read_table(str(tmp_path)).column("run_id").to_pylist()) == expected
    for hive in ("", ", hive_partitioning=true"):  # DuckDB detects the partitioning by itself
        q = f"select run_id, count(*) from read_parquet('{tmp_path}/run_id=*/*.parquet'{hive}) group by run_id"
        assert dict(duckdb.sql(q).fetchall()) == expected
    q = f"select count(*) from read_parquet('{tmp_path}/run_id=*/*.parquet', hive_partitioning=false)"
    assert duckdb.sql(q).fetchall()[0][0] == 15
    assert counts(out.read_finished().column("run_id").to_pylist()) == expected


def test_retried_write_replaces_its_own_part(tmp_path):
    out = output.Output(str(tmp_path))
    name = output.part_name(0, 7)
    out.write_part("R1", name, rows(5))
    out.write_part("R1", name, rows(5))  # the same part written again (a retry)
    assert [os.path.basename(p) for p in out.staged_parts("R1")] == [name]
    assert not [p for p in os.listdir(tmp_path / "_staging" / "run_id=R1") if p.endswith(".tmp")]


def test_interrupted_publish_rolls_forward(tmp_path):
    out = output.Output(str(tmp_path))
    out.write_part("R1", output.part_name(0, 0), rows(3))
    manifest = {output.M_RUN_ID: "R1", output.M_STATUS: output.STATUS_COMPLETE, output.M_MODEL_ID: "M"}
    files = {output.M_FILES: ["run_id=R1/part-00-000000.parquet"]}
    out.write_json(out.staging("R1", output.MANIFEST_FILE), {**manifest, **files})
    assert out.finished_runs() == []  # crashed after deciding to commit, before publishing
    assert ds.dataset(str(tmp_path), format="parquet").count_rows() == 0
    assert out.recover() == ["R1"]
    assert [m[output.M_RUN_ID] for m in out.finished_runs()] == ["R1"]
    assert out.read_finished().num_rows == 3


def test_done_keys_from_finished_runs_of_the_same_model(tmp_path):
    out = output.Output(str(tmp_path))
    for run_id, model in (("R1", "M"), ("R2", "OTHER")):
        out.write_part(run_id, output.part_name(0, 0), rows(3, model_id=model))
        out.commit(run_id, {output.M_RUN_ID: run_id, output.M_STATUS: output.STATUS_COMPLETE, output.M_MODEL_ID: model})
    keys = out.done_keys("M").content
    assert len(keys) == 3
    assert skipset.contains(keys, skipset.content_key("/data/img1.jpg", None, "shaimg1", "M"))
    assert not skipset.contains(keys, skipset.content_key("/data/img1.jpg", None, "changed", "M"))
    assert not skipset.contains(keys, skipset.content_key("/data/img1.jpg", None, "shaimg1", "OTHER2"))


def test_img_per_s_of_a_short_run_is_the_actors_rate_not_the_arrival_gap():
    """Two batches that reach the driver milliseconds apart once said 2,806 img/s for 120 photos:
    a run too short to time by arrival uses the time the actors spent on its rows."""
    stats = RunStats()
    stats.add(rows(64))
    stats.add(rows(56, prefix="b"))
    stats.busy_s = 2.0
    assert stats.img_per_s(120) == pytest.approx(60.0)


def test_rows_of_an_interrupted_attempt_are_counted_but_not_timed():
    """A resumed run once said 'first rows after 0.2 s' and a rate that subtracted the resumed rows
    from the fresh ones: the rows read back from staging are not this attempt's first rows."""
    stats = RunStats()
    stats.add(rows(3584, prefix="old"), resumed=True)
    assert stats.images == 3584 and stats.first_row_at is None
    stats.add(rows(64))
    assert stats.first_rows == 64 and stats.first_row_at is not None and stats.images == 3648
    stats.add(rows(56, prefix="b"))
    stats.busy_s = 2.0
    assert stats.img_per_s(120) == pytest.approx(60.0)


def test_manifest_exit_codes():
    stats = RunStats(min_prob=0.75)
    stats.add(rows(10, errors_every=5))  # 2 errors of 10
    kwargs = dict(run_id="R", model_id="M", runtime="openvino", inputs=["x"], attempts=1, resumed_rows=0, config={})
    ok = build_manifest(stats, max_error_rate=0.5, **kwargs)
    assert ok[output.M_IMAGES] == 10 and ok[output.M_ERRORS] == 2 and ok[output.M_ERRORS_BY_KIND] == {"not an image": 2}
    assert ok[output.M_LOW_CONFIDENCE] == 8 and ok[output.M_BREEDS] == {"Beta": 8}
    assert exit_code(ok) == EXIT_OK
    over = build_manifest(stats, max_error_rate=0.1, **kwargs)
    assert exit_code(over) == EXIT_ERROR_BUDGET and "exceeds --max-error-rate" in summary_text(over, 0.75)
    assert exit_code(None) == EXIT_FAILED


def test_leftover_staging_of_a_published_run_is_cleared_not_fatal(tmp_path):
    """A publish that happened, with its staging copy still there (e.g. copied back by hand or a
    crash of an old version): the next run's recovery removes the copy instead of failing forever."""
    out = output.Output(str(tmp_path))
    out.write_part("R1", output.part_name(0, 0), rows(3))
    manifest = {output.M_RUN_ID: "R1", output.M_STATUS: output.STATUS_COMPLETE, output.M_MODEL_ID: "M"}
    out.commit("R1", manifest)
    out.write_part("R1", output.part_name(0, 0), rows(3))
    out.write_json(out.staging("R1", output.MANIFEST_FILE), manifest)
    assert out.recover() == ["R1"]
    assert out.staged_runs() == [] and out.read_finished().num_rows == 3


def test_a_resumed_run_drops_rows_a_run_finished_since_then(tmp_path, caplog):
    """Run A (inputs X) died with staged rows; run B finished meanwhile and labelled some of the same
    keys; A's rerun must not publish a second row for them (and says so once, not once per part)."""
    import logging

    from core.label_config import LabelConfig
    from core.label_run import LabelRun

    out = output.Output(str(tmp_path))
    cfg = LabelConfig(inputs=("/data",), model="bundle", out=str(tmp_path))
    first = LabelRun.start(out, cfg, "M", None)
    out.write_part(first.run_id, output.part_name(0, 0), rows(6).slice(0, 3))  # A staged img0..img5, then died
    out.write_part(first.run_id, output.part_name(0, 1), rows(6).slice(3))
    out.write_part("B", output.part_name(0, 0), rows(4))            # B published img0..img3
    out.commit("B", {output.M_RUN_ID: "B", output.M_STATUS: output.STATUS_COMPLETE, output.M_MODEL_ID: "M"})
    with caplog.at_level(logging.INFO, logger="core.label_run"):
        again = LabelRun.start(out, cfg, "M", None)
    assert again.run_id == first.run_id and again.attempt == 1 and again.resumed_rows == 2
    said = [r.getMessage() for r in caplog.records if "a later finished run already holds" in r.getMessage()]
    assert said == [f"run {first.run_id}: dropped 4 staged rows that a later finished run already holds"]
    again.commit(None)
    table = out.read_finished()
    assert table.num_rows == 6 and len(set(table.column("uri").to_pylist())) == 6
    assert skipset.contains(again.done_keys, skipset.content_key("/data/img5.jpg", None, "shaimg5", "M"))


def test_part_writer_stages_by_rows_and_by_time(tmp_path):
    now = [0.0]
    writer = output.PartWriter(output.Output(str(tmp_path)), "R1", 0, rows_per_file=100, every_s=30,
                               clock=lambda: now[0])
    writer.add(rows(3))
    assert writer.files == []          # neither 100 rows nor 30 s yet
    now[0] = 31.0
    writer.add(rows(2, prefix="b"))
    assert writer.rows == 5 and len(writer.files) == 1  # 30 s passed: what arrived is staged
    writer.add(rows(250, prefix="c"))
    assert writer.rows == 205 and len(writer.files) == 3  # two full parts; 50 rows wait


def test_an_attempt_that_stalled_past_its_lease_adds_no_row(tmp_path):
    """Attempt A stalls past its lease; B takes the lease over and resumes A's staged rows; A wakes
    and stages one more part before it learns it lost the lease. B publishes only the parts it
    counted (A's late rows are B's to label), and A stages nothing once it knows."""
    from core import lease as leases
    from core.label_config import LabelConfig
    from core.label_run import LabelRun
    from core.labelling import SKIPPED

    def pipeline_rows(n: int, prefix: str) -> pa.Table:
        table = rows(n, prefix=prefix)
        return table.append_column(SKIPPED, pa.array([False] * n))

    out = output.Output(str(tmp_path))
    cfg = LabelConfig(inputs=("/data",), model="bundle", out=str(tmp_path), rows_per_file=4)
    t0 = 1_000_000.0
    a = LabelRun.start(out, cfg, "M", leases.acquire(out.uri, "a", ttl_s=10, clock=lambda: t0))
    a.add(pipeline_rows(4, "early"))  # staged: part-00-000000
    b = LabelRun.start(out, cfg, "M", leases.acquire(out.uri, "b", ttl_s=10, clock=lambda: t0 + 3600))
    assert b.run_id == a.run_id and b.resumed_rows == 4
    a.add(pipeline_rows(4, "late"))  # A has not renewed since: it stages part-00-000001
    assert len(out.staged_parts(a.run_id)) == 2
    b.add(pipeline_rows(4, "late"))  # B labels the same inputs itself
    manifest = b.commit(None)
    table = out.read_finished()
    assert table.num_rows == 8 and len(set(table.column("uri").to_pylist())) == 8
    assert manifest[output.M_IMAGES] == 8 and len(manifest[output.M_FILES]) == 2
    with pytest.raises(leases.LeaseLostError):
        a.commit(None)
    assert a.lease.lost
    with pytest.raises(leases.LeaseLostError):
        a.add(pipeline_rows(4, "later"))
    a.stage()
    assert out.staged_runs() == [] and out.read_finished().num_rows == 8


def test_an_attempt_that_wakes_past_its_lease_asks_before_staging(tmp_path):
    """The same stall, seen by A's own clock: A's first write after waking renews its out-of-date
    lease, finds it taken over, and stages nothing (it used to stage one more part first)."""
    from core import lease as leases
    from core.label_config import LabelConfig
    from core.label_run import LabelRun
    from core.labelling import SKIPPED

    out = output.Output(str(tmp_path))
    cfg = LabelConfig(inputs=("/data",), model="bundle", out=str(tmp_path), rows_per_file=4, lease_ttl_s=10)
    now = [1_000_000.0]
    a = LabelRun.start(out, cfg, "M", leases.acquire(out.uri, "a", ttl_s=10, clock=lambda: now[0]))
    a.add(rows(4, prefix="early").append_column(SKIPPED, pa.array([False] * 4)))
    now[0] += 3600  # A froze for an hour; B took over meanwhile
    LabelRun.start(out, cfg, "M", leases.acquire(out.uri, "b", ttl_s=10, clock=lambda: now[0]))
    with pytest.raises(leases.LeaseLostError, match="taken over"):
        a.add(rows(4, prefix="late").append_column(SKIPPED, pa.array([False] * 4)))
    a.stage()
    assert len(out.staged_parts(a.run_id)) == 1 and a.lease.lost


def test_a_failed_read_is_read_again_by_the_next_run_and_a_failed_decode_is_not(tmp_path):
    """A row whose bytes could not be read (a permission fixed since, an object re-created) is
    listed and read again by the next run; one whose bytes failed to decode is skipped unread, as
    a labelled one is. Both keep their content key, so failing again adds no second row."""
    from core.label_config import LabelConfig
    from core.label_run import LabelRun
    from core.labelling import SKIPPED
    from core.sources import InputItem

    errors = [None, "access denied", "not found", "cannot read", "not an image", "corrupt archive: BadZipFile"]
    n = len(errors)
    uris = [f"/data/f{i}.jpg" for i in range(n)]
    labelled = np.array([e is None for e in errors])
    shas = [schema.UNREAD_SHA256 if e in ("access denied", "not found", "cannot read") else f"sha{i}"
            for i, e in enumerate(errors)]  # a failed read has no bytes to hash
    table = schema.build_table(
        uris=uris, members=[None] * n, sizes=[0] * n, sha256s=shas, widths=[10] * n,
        heights=[10] * n, probs=np.tile(np.float32([[0.2, 0.7, 0.1]]), (int(labelled.sum()), 1)),
        labelled=labelled, errors=errors, class_ids=CLASS_IDS, class_names=CLASS_NAMES, model_id="M", k=2,
        versions=[f"v{i}" for i in range(n)])
    out = output.Output(str(tmp_path))
    cfg = LabelConfig(inputs=("/data",), model="bundle", out=str(tmp_path))
    first = LabelRun.start(out, cfg, "M", None)
    first.add(table.append_column(SKIPPED, pa.array([False] * n)))
    first.commit(None)
    again = LabelRun.start(out, cfg, "M", None)
    listed = [InputItem(uri, version=f"v{i}") for i, uri in enumerate(uris)]
    assert again.keep(listed).tolist() == [False, True, True, True, False, False]
    for i in range(n):  # the actors skip a row whose read fails the same way again
        assert skipset.contains(again.done_keys, skipset.content_key(uris[i], None, shas[i], "M"))
    retried = table.slice(1, 3)  # read again (the listing kept them); they failed again: skipped by content
    again.add(retried.append_column(SKIPPED, pa.array([True] * 3)))
    manifest = again.commit(None)
    assert manifest[output.M_SKIPPED] == 3
    assert manifest[output.M_STILL_UNREADABLE] == {"access denied": 1, "not found": 1, "cannot read": 1}
    assert "still unreadable, as in an earlier run (no second row; fix it and rerun): access denied: 1" in (
        summary_text(manifest, 0.5))
    third = LabelRun.start(out, cfg, "M", None)
    assert third.keep(listed).tolist() == [False, True, True, True, False, False]  # still retried
    assert out.read_finished().num_rows == n


def test_the_lease_names_the_run_it_protects_from_the_start(tmp_path):
    """A run waiting on the lease is told the run id that will be published, not a provisional one."""
    from core import lease as leases
    from core.label_config import LabelConfig
    from core.label_run import LabelRun

    out = output.Output(str(tmp_path))
    cfg = LabelConfig(inputs=("/data",), model="bundle", out=str(tmp_path))
    held = leases.acquire(out.uri, output.new_run_id(), ttl_s=60)
    announced = leases.read_lease(out.uri).run_id
    run = LabelRun.start(out, cfg, "M", held)
    assert run.run_id == announced == leases.read_lease(out.uri).run_id


def test_an_s3_output_that_does_not_answer_a_write_names_the_endpoint():
    """A write to an S3 output whose endpoint is down said "cannot write …: <curl's text>; check the
    output URI and permissions": the user went looking at the URI, not at the endpoint."""
    import socket

    from core.errors import ServiceError
    from core.s3 import S3Options

    with socket.socket() as sock:  # a port where nothing listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = output.Output("s3://bucket/labels", s3=S3Options(endpoint_url=f"http://127.0.0.1:{port}", max_attempts=1,
                                                            read_timeout_s=2))
    with pytest.raises(ServiceError, match=rf"^s3://bucket/labels: the S3 endpoint http://127.0.0.1:{port} does not "
                                           r"answer \(write bucket/labels/_x.json: .*\); check the endpoint URL"):
        out.write_json(out.path("_x.json"), {"a": 1})


def test_a_run_resumes_only_at_the_dog_threshold_it_flagged_its_rows_with(tmp_path):
    """`is_dog` is decided as rows are staged: a rerun with another --dog-threshold resumed the
    interrupted run and published rows flagged at two thresholds under one manifest's. A run staged
    before the threshold was part of the identity (no key in its _run.json) still resumes."""
    import dataclasses

    from core.label_config import LabelConfig
    from core.label_run import RUN_DOG_THRESHOLD, LabelRun

    out = output.Output(str(tmp_path))
    cfg = LabelConfig(inputs=("/data",), model="bundle", out=str(tmp_path), dog_threshold=0.5)
    first = LabelRun.start(out, cfg, "M", None)
    out.write_part(first.run_id, output.part_name(0, 0), rows(3))
    other = LabelRun.start(out, dataclasses.replace(cfg, dog_threshold=0.8), "M", None)
    assert other.run_id != first.run_id and other.resumed_rows == 0
    out.discard_staged(other.run_id)
    assert LabelRun.start(out, cfg, "M", None).run_id == first.run_id
    meta = out.read_json(out.staging(first.run_id, output.RUN_FILE))
    del meta[RUN_DOG_THRESHOLD]
    out.write_json(out.staging(first.run_id, output.RUN_FILE), meta)
    assert LabelRun.start(out, cfg, "M", None).run_id == first.run_id
