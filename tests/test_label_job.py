"""The label job on a real local Ray with several actors: folders, archives, every bad-input kind,
a vanished object, the output read back by pandas/pyarrow/DuckDB, incremental reruns, dry-run,
--max-error-rate and the two-stage pipeline."""
from __future__ import annotations

import argparse
import io
import tarfile
import zipfile
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow.dataset as ds
import pytest

from core import output
from core.errors import EXIT_ERROR_BUDGET, EXIT_OK
from jobs import label as label_cmd
from core.label_config import LabelConfig
from jobs.label import label
from tests.fixtures.images import jpeg_bytes, png_bytes, sample_images

SMALL = dict(actors=2, cpus_per_actor=1, batch_size=4, rows_per_file=7, io_threads=2, progress=False)


def _tar_gz(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _zip_with_corrupt_member(path: Path) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("a/one.jpg", jpeg_bytes(40, 30))
        zf.writestr("a/two.png", png_bytes(30, 40))
        zf.writestr("a/bad.jpg", jpeg_bytes(50, 50))
    raw = bytearray(path.read_bytes())
    start = raw.index(jpeg_bytes(50, 50)[:64], raw.index(b"a/bad.jpg") + 9)
    raw[start + 300:start + 340] = bytes(40)  # damaged bytes: CRC check fails
    path.write_bytes(bytes(raw))


@pytest.fixture
def inputs(tmp_path, image_factory):
    """A folder with every catalogued kind, a tar.gz, a zip with a corrupt member, a corrupt
    archive, and a manifest naming an object that is gone. Returns (inputs, manifest, expected rows)."""
    folder = tmp_path / "photos"
    kinds = image_factory.folder(folder=folder)
    _tar_gz(folder / "batch.tar.gz", {"x/1.jpg": jpeg_bytes(60, 40), "x/2.jpg": jpeg_bytes(40, 60),
                                      "x/readme.txt": b"not listed: no image extension"})
    _zip_with_corrupt_member(tmp_path / "upload.zip")
    (tmp_path / "broken.tar.gz").write_bytes(b"\x1f\x8b\x08\x00garbage" * 50)
    manifest = tmp_path / "more.txt"
    manifest.write_text(f"{tmp_path}/gone/vanished.jpg\n")
    expected = len(kinds) + 2 + 3 + 1 + 1
    return (str(folder), str(tmp_path / "upload.zip"), str(tmp_path / "broken.tar.gz")), str(manifest), expected


@pytest.mark.slow
def test_every_input_kind_gives_exactly_one_row(ray_local, inputs, tmp_path, tiny_bundle):
    paths, manifest, expected = inputs
    out = tmp_path / "out"
    cfg = LabelConfig(inputs=paths, manifests=(manifest,), model=str(tiny_bundle), out=str(out), **SMALL)
    m = label(cfg)
    assert m[output.M_IMAGES] == expected and m[output.M_EXIT_CODE] == EXIT_OK
    df = pd.read_parquet(out)
    assert len(df) == expected
    assert not df.duplicated(["uri", "member"]).any()
    err = dict(zip(df.uri + "|" + df.member.fillna(""), [None if pd.isna(e) else e for e in df.error]))
    assert err[f"{tmp_path}/gone/vanished.jpg|"] == "not found"
    assert err[f"{tmp_path}/broken.tar.gz|"].startswith("corrupt archive")
    assert err[f"{tmp_path}/upload.zip|a/bad.jpg"].startswith("corrupt archive")
    assert err[f"{tmp_path}/upload.zip|a/one.jpg"] is None and err[f"{paths[0]}/batch.tar.gz|x/2.jpg"] is None
    for sample in sample_images():
        got = err[f"{paths[0]}/{sample.kind}__{sample.filename}|"]
        assert (got is None) if sample.error is None else got.startswith(sample.error), sample.kind
    assert sum(m[output.M_ERRORS_BY_KIND].values()) == m[output.M_ERRORS] == int(df.error.notna().sum())
    assert m[output.M_ERRORS_BY_KIND]["unsupported format (HEIF)"] == 1  # a phone's .heic: its row, not skipped
    assert len(m[output.M_FILES]) == -(-expected // 7)  # deterministic parts of rows_per_file rows
    assert ds.dataset(str(out), format="parquet").count_rows() == expected
    q = f"select count(distinct uri || coalesce(member, '')) from read_parquet('{out}/run_id=*/*.parquet')"
    assert duckdb.sql(q).fetchall()[0][0] == expected


@pytest.mark.slow
def test_incremental_rerun_labels_only_new_images(ray_local, tmp_path, tiny_bundle, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(6):
        (folder / f"p{i}.jpg").write_bytes(jpeg_bytes(40 + i, 30))
    out = tmp_path / "out"
    base = dict(inputs=(str(folder),), model=str(tiny_bundle), out=str(out), **SMALL)
    assert label(LabelConfig(**base))[output.M_IMAGES] == 6
    (folder / "new.png").write_bytes(png_bytes(33, 33))
    (folder / "p0.jpg").write_bytes(jpeg_bytes(99, 30))  # changed content: labelled again
    label(LabelConfig(**base, dry_run=True))
    printed = capsys.readouterr()
    assert sorted(printed.out.split()) == [str(folder / "new.png"), str(folder / "p0.jpg")]
    assert "7 inputs, 5 already labelled" in printed.err
    second = label(LabelConfig(**base))
    assert second[output.M_IMAGES] == 2 and second[output.M_SKIPPED] == 5
    df = pd.read_parquet(out)
    assert len(df) == 8 and df.groupby("run_id", observed=True).size().sort_values().tolist() == [2, 6]


@pytest.mark.slow
def test_error_budget_exit_code_3_with_every_row_written(ray_local, tmp_path, tiny_bundle, image_factory):
    folder = tmp_path / "photos"
    image_factory.folder(["jpeg", "png", "empty", "text_as_jpg"], folder=folder)
    parser = argparse.ArgumentParser()
    label_cmd.add_arguments(parser)
    argv = [str(folder), "--model", str(tiny_bundle), "--out", str(tmp_path / "out"), "--actors", "1",
            "--cpus-per-actor", "1", "--no-progress", "--max-error-rate", "0.25"]
    assert label_cmd.run(parser.parse_args(argv)) == EXIT_ERROR_BUDGET
    assert len(pd.read_parquet(tmp_path / "out")) == 4
    argv[-1] = "0.5"
    argv[argv.index("--out") + 1] = str(tmp_path / "out2")
    assert label_cmd.run(parser.parse_args(argv)) == EXIT_OK


@pytest.mark.slow
def test_two_stage_pipeline_gives_the_same_rows(ray_local, tmp_path, tiny_bundle, image_factory):
    folder = tmp_path / "photos"
    image_factory.folder(["jpeg", "png", "truncated_jpeg", "webp", "cmyk_jpeg"], folder=folder)
    results = {}
    for pipeline in ("fused", "two-stage"):
        cfg = LabelConfig(inputs=(str(folder),), model=str(tiny_bundle), out=str(tmp_path / pipeline),
                          pipeline=pipeline, **SMALL)
        assert label(cfg)[output.M_CONFIG]["plan"]["pipeline"] == pipeline
        df = pd.read_parquet(tmp_path / pipeline).sort_values("uri").reset_index(drop=True)
        results[pipeline] = df[["uri", "breed", "error", "width", "height", "content_sha256"]]
    pd.testing.assert_frame_equal(results["fused"], results["two-stage"])
