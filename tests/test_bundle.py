"""Export bundle: plain tf.saved_model.load works, uint8 signature, same probs as the Keras
model, and load_bundle refuses pickles, names missing/mismatched files, detects tampering."""
from __future__ import annotations

import importlib.metadata
import json
import shutil

import numpy as np
import pytest

from core.bundle import CARD_FILE, LABELS_FILE, MODEL_DIR, SIGNATURE, bundle_id, compute_model_id, load_bundle
from core.errors import BundleError, ConfigError
from tests.fixtures.models import build_tiny_model, tiny_classes


@pytest.fixture()
def bundle_copy(tiny_bundle, tmp_path):
    dest = tmp_path / "copy"
    shutil.copytree(tiny_bundle, dest)
    return dest


def _images(n=5, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_saved_model_loads_plainly_and_matches_keras(tmp_path):
    import tensorflow as tf

    from core.bundle import export_bundle

    model = build_tiny_model(4, 32)
    export_bundle(model, tiny_classes(4), str(tmp_path / "b"), input_size=32)
    loaded = tf.saved_model.load(str(tmp_path / "b" / MODEL_DIR))
    fn = loaded.signatures[SIGNATURE]
    spec = fn.structured_input_signature[1]["images"]
    assert spec.dtype == tf.uint8 and spec.shape.as_list() == [None, 32, 32, 3]
    x = _images(7)
    got = fn(images=tf.constant(x))["probs"]
    assert got.dtype == tf.float32
    want = model(x.astype(np.float32), training=False).numpy()
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5)
    assert fn(images=tf.constant(_images(1)))["probs"].shape == (1, 4)  # any batch size


def test_card_and_labels(tiny_bundle):
    b = load_bundle(str(tiny_bundle))
    card = json.loads((tiny_bundle / CARD_FILE).read_text())
    for key in ("format_version", "model_id", "backbone", "input_size", "resize_policy", "train_config",
                "data_fingerprint", "metrics", "created_at", "library_versions"):
        assert key in card
    assert card["format_version"] == 2 and card["hashes"]["model/"] == compute_model_id(tiny_bundle / MODEL_DIR)
    assert b.model_id == card["model_id"] == bundle_id(card["hashes"]["model/"], card["hashes"]["labels.json"], card)
    assert b.input_size == (32, 32) and b.resize_policy == "resize_crop"
    assert card["library_versions"]["breedlabel"] == importlib.metadata.version("breedlabel")  # which code exported
    assert [c.id for c in b.classes] == [c.id for c in tiny_classes(4)]
    assert b.path == str(tiny_bundle)


def test_file_uri(tiny_bundle):
    assert load_bundle(f"file://{tiny_bundle}").model_id == load_bundle(str(tiny_bundle)).model_id


@pytest.mark.parametrize("name", ["evil.pkl", "model/assets/x.PICKLE"])
def test_pickle_refused(bundle_copy, name):
    (bundle_copy / name).write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(BundleError, match=name.split("/")[-1]):
        load_bundle(str(bundle_copy), verify=False)


@pytest.mark.parametrize("missing", [CARD_FILE, LABELS_FILE, "model/saved_model.pb",
                                     "model/variables/variables.index"])
def test_missing_file_named(bundle_copy, missing):
    (bundle_copy / missing).unlink()
    with pytest.raises(BundleError, match=missing):
        load_bundle(str(bundle_copy))


def test_the_training_run_folder_beside_a_bundle_is_named_as_such(bundle_copy):
    """`train --out B` writes B and B.run (checkpoints, history): `--model B.run` was "incomplete:
    missing card.json, …; re-copy or re-export the bundle", which sent people to train again."""
    run = bundle_copy.with_name(bundle_copy.name + ".run")
    run.mkdir()
    (run / "history.json").write_text("{}")
    with pytest.raises(BundleError, match=rf"^{run} is the training run folder \(checkpoints, history\) of the "
                                          rf"bundle {bundle_copy}; pass --model {bundle_copy}$"):
        load_bundle(str(run))


def test_missing_bundle(tmp_path):
    with pytest.raises(BundleError, match="not found"):
        load_bundle(str(tmp_path / "nope"))


def test_label_count_mismatch(bundle_copy):
    labels = json.loads((bundle_copy / LABELS_FILE).read_text())
    (bundle_copy / LABELS_FILE).write_text(json.dumps(labels[:3]))
    with pytest.raises(BundleError, match="labels.json lists 3 classes"):
        load_bundle(str(bundle_copy))


def test_model_width_mismatch_detected_by_runtime(bundle_copy):
    from core.runtime import load_runtime

    labels = json.loads((bundle_copy / LABELS_FILE).read_text())
    (bundle_copy / LABELS_FILE).write_text(json.dumps(labels + [{"id": "x", "name": "x"}]))
    card = json.loads((bundle_copy / CARD_FILE).read_text())
    card["num_classes"] = 5
    (bundle_copy / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(BundleError, match="labels.json was changed"):
        load_bundle(str(bundle_copy))
    bundle = load_bundle(str(bundle_copy), verify=False)  # the runtime checks the width again on its own
    with pytest.raises(BundleError, match="outputs 4 classes"):
        load_runtime(bundle, "tensorflow")


@pytest.mark.parametrize("edit, match", [
    (lambda labels, card: labels.__setitem__(slice(0, 2), [labels[1], labels[0]]), "labels.json was changed"),
    (lambda labels, card: card.__setitem__("input_size", 64), "card.json was edited"),
    (lambda labels, card: card.__setitem__("resize_policy", "squash"), "card.json was edited"),
    (lambda labels, card: card.__setitem__("model_id", "0" * 64), "card.json was edited"),
])
def test_edits_that_change_predictions_are_refused(bundle_copy, edit, match):
    """Swapped class names, another input size or resize policy: model_id covers them all."""
    labels = json.loads((bundle_copy / LABELS_FILE).read_text())
    card = json.loads((bundle_copy / CARD_FILE).read_text())
    edit(labels, card)
    (bundle_copy / LABELS_FILE).write_text(json.dumps(labels))
    (bundle_copy / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(BundleError, match=match):
        load_bundle(str(bundle_copy))


def test_a_file_given_as_the_bundle_is_named_as_such(tmp_path):
    (tmp_path / "model.h5").write_bytes(b"x")
    with pytest.raises(BundleError, match="model.h5 is a file, not a bundle"):
        load_bundle(str(tmp_path / "model.h5"))


def test_format_1_bundles_still_load(bundle_copy):
    """Exported before model_id covered labels.json: its model_id is the hash of model/ alone."""
    import logging

    card = json.loads((bundle_copy / CARD_FILE).read_text())
    card.update(format_version=1, model_id=card.pop("hashes")["model/"])
    (bundle_copy / CARD_FILE).write_text(json.dumps(card))
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logging.getLogger("core.bundle").addHandler(handler)
    try:
        assert load_bundle(str(bundle_copy)).model_id == compute_model_id(bundle_copy / MODEL_DIR)
    finally:
        logging.getLogger("core.bundle").removeHandler(handler)
    assert any("format 1" in s and "re-export" in s for s in seen)


def test_bad_card(bundle_copy):
    (bundle_copy / CARD_FILE).write_text("{not json")
    with pytest.raises(BundleError, match="card.json"):
        load_bundle(str(bundle_copy))


def test_tampered_model_detected(bundle_copy):
    var = next((bundle_copy / MODEL_DIR / "variables").glob("variables.data-*"))
    data = bytearray(var.read_bytes())
    data[-1] ^= 0xFF
    var.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="tampered"):
        load_bundle(str(bundle_copy))
    assert load_bundle(str(bundle_copy), verify=False).model_id  # opt-out for speed


def test_export_validates(tmp_path):
    from core.bundle import export_bundle

    model = build_tiny_model(4, 32)
    with pytest.raises(BundleError, match="outputs 4 classes but 3"):
        export_bundle(model, tiny_classes(3), str(tmp_path / "a"), input_size=32)
    with pytest.raises(ConfigError, match="model_id"):
        export_bundle(model, tiny_classes(4), str(tmp_path / "b"), input_size=32, card_extra={"model_id": "x"})
    with pytest.raises(ConfigError, match="resize_policy"):
        export_bundle(model, tiny_classes(4), str(tmp_path / "c"), input_size=32, resize_policy="stretch")


def test_export_refuses_to_overwrite(tiny_bundle):
    from core.bundle import export_bundle

    with pytest.raises(BundleError, match="already exists"):
        export_bundle(build_tiny_model(4, 32), tiny_classes(4), str(tiny_bundle), input_size=32)


def test_the_export_target_is_checked_before_training(tiny_bundle, tmp_path, moto_s3):
    from core.bundle import check_export_target
    from core.errors import StorageError

    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "dog.jpg").write_bytes(b"jpeg")
    refused = {str(tiny_bundle): "a bundle already exists", str(tmp_path / "photos"): "holds other files",
               str(tmp_path / "photos" / "dog.jpg"): "is a file",
               str(tmp_path / "photos" / "dog.jpg" / "b"): "cannot write the bundle"}
    for out, message in refused.items():
        with pytest.raises((BundleError, StorageError), match=message):
            check_export_target(out)
    for fine in (tmp_path / "new" / "deeper", tmp_path / "empty"):
        (tmp_path / "empty").mkdir(exist_ok=True)
        check_export_target(str(fine))
    assert not (tmp_path / "new").exists() and list((tmp_path / "empty").iterdir()) == []  # left as found
    bucket = moto_s3.make_bucket("targets")
    check_export_target(f"{bucket}/b1")
    from core import storage
    assert not storage.is_dir(f"{bucket}/b1")  # the write check leaves nothing behind
    storage.write_bytes(f"{bucket}/b2/card.json", b"{}")
    with pytest.raises(BundleError, match="objects already exist"):
        check_export_target(f"{bucket}/b2")
    with pytest.raises(StorageError):
        check_export_target("s3://no-such-bucket-here/b")


def test_s3_round_trip(tiny_bundle, moto_s3, tmp_path, monkeypatch):
    from core import storage
    from core.bundle import export_bundle

    monkeypatch.setenv("BREEDLABEL_CACHE", str(tmp_path / "cache"))
    uri = moto_s3.make_bucket("bundles") + "/tiny/v1"
    exported = export_bundle(build_tiny_model(4, 32), tiny_classes(4), uri, input_size=32)
    loaded = load_bundle(uri)
    assert loaded.model_id == exported.model_id
    assert loaded.path.startswith(str(tmp_path / "cache"))
    assert load_bundle(uri).path == loaded.path  # cached, not downloaded again
    storage.write_bytes(f"{uri}/extra.pickle", b"x")
    with pytest.raises(BundleError, match="extra.pickle"):
        load_bundle(uri)
