"""The label actor's batch logic without Ray (core.labelling): every bad-input kind gives a row
with the right label or a short error, nothing is dropped, fused == two-stage, skip-set works,
and the OpenVINO and TensorFlow runtimes agree on the rows."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from core import labelling, schema, skipset
from core.bundle import load_bundle
from core.sources import InputItem, ItemData
from tests.fixtures.images import SAMPLE_KINDS, sample_images


def batch_of(samples, missing: int = 0, errors: dict | None = None) -> pa.Table:
    """A chunk as the listing hands it to an actor: bytes given (like archive members) or to read."""
    items = [ItemData(InputItem(f"mem://{s.kind}/{s.filename}"), s.data, None) for s in samples]
    items += [ItemData(InputItem(f"/nonexistent/gone{i}.jpg"), None, None) for i in range(missing)]
    items += [ItemData(InputItem(uri, error=reason), None, reason) for uri, reason in (errors or {}).items()]
    return labelling.chunk_table(items)


@pytest.fixture(scope="module")
def labeller(tiny_bundle):
    return labelling.BatchLabeller(load_bundle(str(tiny_bundle)), runtime="openvino", threads=1,
                                   decode_threads=2, io_threads=2, top_k=3)


def test_every_kind_gives_one_row_with_label_or_reason(labeller):
    samples = sample_images()
    assert len(samples) == len(SAMPLE_KINDS) >= 20
    table = labeller.label(batch_of(samples, missing=1))
    assert table.num_rows == len(samples) + 1
    got = table.to_pylist()
    for sample, row in zip(samples, got):
        if sample.error is None:
            assert row["error"] is None, sample.kind
            assert (row["width"], row["height"]) == (sample.width, sample.height), sample.kind
            assert len(row["top_k"]) == 3 and row["breed"] == row["top_k"][0]["breed"]
            assert [e["prob"] for e in row["top_k"]] == sorted((e["prob"] for e in row["top_k"]), reverse=True)
        else:  # the short reason, possibly with a detail: "unsupported format (TIFF)"
            assert row["error"].startswith(sample.error), sample.kind
            assert row["top_k"] == [] and row["breed"] is None and row["width"] is None
        assert row["bytes"] == len(sample.data) and row["model_id"] == labeller.bundle.model_id
    assert got[-1]["error"] == "not found" and got[-1]["bytes"] == 0  # vanished between listing and reading
    assert not any(table.column(labelling.SKIPPED).to_pylist())
    assert table.drop_columns([labelling.SKIPPED]).schema.remove_metadata().equals(schema.FILE_SCHEMA)
    assert table.schema.metadata[labelling.RUNTIME_META] == b"openvino/f32"  # what the actor really ran


def test_listing_errors_pass_through(labeller):
    row = labeller.label(batch_of([], errors={"s3://b/broken.tar": "corrupt archive: ReadError"})).to_pylist()[0]
    assert row["error"] == "corrupt archive: ReadError" and row["top_k"] == []


def test_two_stage_matches_fused(labeller, tiny_bundle):
    samples = sample_images(["jpeg", "png", "cmyk_jpeg", "truncated_jpeg", "webp"])
    fused = labeller.label(batch_of(samples))
    bundle = load_bundle(str(tiny_bundle))
    decoded = labelling.decode_chunk(batch_of(samples), size=bundle.input_size, policy=bundle.resize_policy,
                                     model_id=bundle.model_id, io_threads=1)
    staged = labeller.label_decoded(decoded)
    cols = [schema.URI, schema.BYTES, schema.CONTENT_SHA256, schema.WIDTH, schema.HEIGHT, schema.BREED, schema.ERROR]
    assert staged.select(cols).to_pylist() == fused.select(cols).to_pylist()
    np.testing.assert_allclose(staged.column(schema.PROB).to_numpy(zero_copy_only=False),
                               fused.column(schema.PROB).to_numpy(zero_copy_only=False), atol=1e-6)


def test_done_keys_skip_only_identical_content(tiny_bundle):
    bundle = load_bundle(str(tiny_bundle))
    samples = sample_images(["jpeg", "png"])
    first = labelling.BatchLabeller(bundle, runtime="openvino", threads=1).label(batch_of(samples)).to_pylist()
    done = skipset.key_set([skipset.content_key(first[0]["uri"], None, first[0]["content_sha256"], bundle.model_id)])
    again = labelling.BatchLabeller(bundle, runtime="openvino", threads=1, done_keys=done).label(batch_of(samples))
    assert again.column(labelling.SKIPPED).to_pylist() == [True, False]


def test_a_read_that_fails_again_is_skipped_and_keeps_its_reason(tiny_bundle):
    """Failing to read an object a finished run also failed to read adds no row (skipped by its
    content key), and the skipped row says why, so the run keeps retrying it (core.skipset)."""
    bundle = load_bundle(str(tiny_bundle))
    gone = batch_of([], missing=1)
    first = labelling.BatchLabeller(bundle, runtime="openvino", threads=1).label(gone).to_pylist()[0]
    assert first["error"] == "not found"
    done = skipset.key_set([skipset.content_key(first["uri"], None, first["content_sha256"], bundle.model_id)])
    again = labelling.BatchLabeller(bundle, runtime="openvino", threads=1, done_keys=done).label(gone).to_pylist()[0]
    assert again[labelling.SKIPPED] and again["error"] == "not found"


def test_runtimes_agree_on_rows(tiny_bundle):
    """Runtime parity through the label path (tiny model; real weights and photos below)."""
    bundle = load_bundle(str(tiny_bundle))
    samples = [s for s in sample_images() if s.error is None]
    ov = labelling.BatchLabeller(bundle, runtime="openvino", threads=1).label(batch_of(samples))
    tf = labelling.BatchLabeller(bundle, runtime="tensorflow", threads=1).label(batch_of(samples))
    assert ov.column(schema.BREED).to_pylist() == tf.column(schema.BREED).to_pylist()
    assert np.max(np.abs(ov.column(schema.PROB).to_numpy() - tf.column(schema.PROB).to_numpy())) <= 0.02


@pytest.mark.shared_data
@pytest.mark.slow
def test_runtime_parity_on_real_photos(real_bundle, sample_bucket_dir):
    """Real weights labelling real photos (the `real_bundle` fixture: BREEDLABEL_TEST_BUNDLE, or
    built from ../shared/weights): top-1 agreement >= 99.5 %, max |dprob| <= 0.02."""
    bundle = load_bundle(str(real_bundle))
    files = sorted(str(p) for p in sample_bucket_dir.rglob("*") if p.is_file())
    batch = labelling.chunk_table([ItemData(InputItem(f), None, None) for f in files])
    ov = labelling.BatchLabeller(bundle, runtime="openvino").label(batch)
    tf = labelling.BatchLabeller(bundle, runtime="tensorflow").label(batch)
    same = np.mean(np.array(ov.column(schema.BREED).to_pylist()) == np.array(tf.column(schema.BREED).to_pylist()))
    assert same >= 0.995
    p_ov = np.array([[e["prob"] for e in r] for r in ov.column(schema.TOP_K).to_pylist()])
    p_tf = np.array([[e["prob"] for e in r] for r in tf.column(schema.TOP_K).to_pylist()])
    assert np.max(np.abs(p_ov[:, 0] - p_tf[:, 0])) <= 0.02
