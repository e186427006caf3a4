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

from core import output, schema
from core.errors import EXIT_ERROR_BUDGET, EXIT_FAILED, EXIT_OK
from core.label_summary import RunStats, build_manifest, exit_code, summary_text

CLASS_IDS = ["n1", "n2", "n3"]
CLASS_NAMES = ["Alpha", "Beta", "Gamma"]


def rows(n: int, run_id: str = "R1", model_id: str = "M", errors_every: int = 0, prefix: str = "img") -> pa.Table:
    labelled = np.array([not (errors_every and i % errors_every == 0) for i in range(n)])
    probs = np.tile(np.array([[0.2, 0.7, 0.1]], np.float32), (int(labelled.sum()), 1))
    return schema.build_table(
        uris=[f"/data/{prefix}{i}.jpg" for i in range(n)], members=[None] * n, sizes=list(range(n)),
        sha256s=[f"sha{prefix}{i}" for i in range(n)], widths=[10] * n, heights=[20] * n, probs=probs,
        labelled=labelled, errors=[None if ok else "not an image" for ok in labelled],
        class_ids=CLASS_IDS, class_names=CLASS_NAMES, model_id=model_id, run_id=run_id, k=2)


def test_schema_is_design_md():
    s = schema.LABEL_SCHEMA
    assert s.names == ["uri", "member", "bytes", "content_sha256", "width", "height", "top_k", "breed", "prob",
                       "error", "model_id", "run_id", "labelled_at"]
    assert s.field("bytes").type == pa.int64() and s.field("width").type == pa.int32()
    assert s.field("prob").type == pa.float32() and s.field("labelled_at").type == pa.timestamp("us", tz="UTC")
    entry = s.field("top_k").type.value_type
    assert [f.name for f in entry] == ["breed_id", "breed", "prob"] and entry.field("prob").type == pa.float32()
    assert s.field("run_id").type.value_type == pa.string()  # dictionary-encoded string (see core.schema)
    for nullable in ("member", "width", "height", "breed", "prob", "error"):
        assert s.field(nullable).nullable


def test_build_table_sorted_topk_and_error_rows():
    t = rows(4, errors_every=2)
    got = t.to_pylist()
    assert got[0]["error"] == "not an image" and got[0]["top_k"] == [] and got[0]["breed"] is None
    assert got[0]["width"] == 10 or got[0]["width"] is None  # widths are the caller's choice
    assert got[1]["breed"] == "Beta" and [e["breed_id"] for e in got[1]["top_k"]] == ["n2", "n1"]
    assert got[1]["prob"] == pytest.approx(0.7)
    assert t.schema.equals(schema.LABEL_SCHEMA)


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
    assert pd.read_parquet(tmp_path).shape[0] == 10
    assert ds.dataset(str(tmp_path), format="parquet").count_rows() == 10
    assert pq.read_table(str(tmp_path)).num_rows == 10
    q = f"select count(*) from read_parquet('{tmp_path}/run_id=*/*.parquet', hive_partitioning=true)"
    assert duckdb.sql(q).fetchall()[0][0] == 10
    assert out.read_finished().num_rows == 10


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
    out.write_json(out.staging("R1", output.COMMIT_FILE), {**manifest, output.M_FILES: ["run_id=R1/part-00-000000.parquet"]})
    assert out.finished_runs() == []  # crashed after deciding to commit, before publishing
    assert out.recover() == ["R1"]
    assert [m[output.M_RUN_ID] for m in out.finished_runs()] == ["R1"]
    assert out.read_finished().num_rows == 3


def test_done_keys_from_finished_runs_of_the_same_model(tmp_path):
    out = output.Output(str(tmp_path))
    for run_id, model in (("R1", "M"), ("R2", "OTHER")):
        out.write_part(run_id, output.part_name(0, 0), rows(3, run_id=run_id, model_id=model))
        out.commit(run_id, {output.M_RUN_ID: run_id, output.M_STATUS: output.STATUS_COMPLETE, output.M_MODEL_ID: model})
    keys = out.done_keys("M")
    assert len(keys) == 3
    assert output.in_key_set(keys, output.key_hash("/data/img1.jpg", None, "shaimg1", "M"))
    assert not output.in_key_set(keys, output.key_hash("/data/img1.jpg", None, "changed", "M"))
    assert not output.in_key_set(keys, output.key_hash("/data/img1.jpg", None, "shaimg1", "OTHER2"))


def test_manifest_exit_codes():
    stats = RunStats(min_prob=0.75)
    stats.add(rows(10, errors_every=5))  # 2 errors of 10
    kwargs = dict(run_id="R", model_id="M", runtime="openvino", inputs=["x"], attempts=1, resumed_rows=0, config={})
    ok = build_manifest(stats, max_error_rate=0.5, **kwargs)
    assert ok[output.M_IMAGES] == 10 and ok[output.M_ERRORS] == 2 and ok[output.M_ERRORS_BY_KIND] == {"not an image": 2}
    assert ok[output.M_LOW_CONFIDENCE] == 8 and ok[output.M_TOP_BREEDS] == {"Beta": 8}
    assert exit_code(ok) == EXIT_OK
    over = build_manifest(stats, max_error_rate=0.1, **kwargs)
    assert exit_code(over) == EXIT_ERROR_BUDGET and "exceeds --max-error-rate" in summary_text(over, 0.75)
    assert exit_code(None) == EXIT_FAILED
