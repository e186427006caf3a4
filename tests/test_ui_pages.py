"""The UI's page logic without a browser: classify verdicts, examples, the run explorer."""
from __future__ import annotations

import os

import numpy as np
import pytest

from core import explore, schema
from core.errors import ConfigError
from jobs.ui_pages import ClassifyPage, ExplorerPage, find_examples, placeholder


@pytest.fixture(scope="module")
def predictor(tiny_bundle):
    from core.predict import Predictor

    return Predictor(str(tiny_bundle))


def test_classify_photo_gives_top3_and_message(predictor, image_factory):
    photo = image_factory.dataset(num_classes=1, images_per_class=1, size=48).rglob("*.jpg").__next__()
    verdict = ClassifyPage(predictor, min_prob=0.0).classify_file(str(photo))
    assert verdict.ok and verdict.preview == str(photo)
    assert len(verdict.label) == 3
    probs = list(verdict.label.values())
    assert probs == sorted(probs, reverse=True) and sum(probs) <= 1.0001
    best = next(iter(verdict.label))
    assert best in verdict.message and "Not sure" not in verdict.message
    expected = predictor.predict_paths([str(photo)])[0].predictions
    assert list(verdict.label) == [p.breed.replace("_", " ") for p in expected]


def test_unsure_below_min_prob(predictor, image_factory):
    photo = image_factory.file("jpeg")
    verdict = ClassifyPage(predictor, min_prob=1.0).classify_file(str(photo))
    assert verdict.ok and verdict.label
    assert "Not sure" in verdict.message and "100%" in verdict.message


@pytest.mark.parametrize("kind", ["text_as_jpg", "html_as_png", "empty", "truncated_jpeg"])
def test_non_image_gives_clear_message(predictor, image_factory, kind):
    path = image_factory.file(kind)
    verdict = ClassifyPage(predictor, 0.5).classify_file(str(path))
    assert not verdict.ok and verdict.label is None and verdict.preview is None
    assert path.name in verdict.message and "Not a photo" in verdict.message
    assert image_factory.sample(kind).error in verdict.message


def test_nothing_uploaded_and_missing_file(predictor, tmp_path):
    page = ClassifyPage(predictor, 0.5)
    assert "Drop a photo" in page.classify_file(None).message
    gone = page.classify_file(str(tmp_path / "gone.jpg"))
    assert not gone.ok and "could not be read" in gone.message


def test_card_summary_names_the_model(predictor):
    text = ClassifyPage(predictor, 0.5).card_markdown()
    assert predictor.bundle.model_id[:16] in text
    assert "**classes**: 4" in text and "32×32 px" in text


def test_find_examples(image_factory, tmp_path):
    root = image_factory.dataset(num_classes=2, images_per_class=3)
    (root / "readme.txt").write_text("x")
    (root / "0-gone.jpg").symlink_to(tmp_path / "nowhere.jpg")  # the label listing gives these a row;
    os.mkfifo(root / "0-pipe.jpg")  # a gallery of them would hang (the pipe) or show a broken tile
    found = find_examples(str(root), limit=4)
    assert len(found) == 4 and found == sorted(found) and all(f.endswith(".jpg") for f in found)
    assert all(os.path.isfile(f) for f in found)
    assert find_examples(None, 10) == []
    with pytest.raises(ConfigError, match="not a folder"):
        find_examples(str(tmp_path / "nope"), 10)


def test_explorer_shows_runs_histogram_unsure_and_errors(label_output):
    view = ExplorerPage(thumbs=30).view(str(label_output), threshold=1.0)
    assert "1 finished run" in view.status
    assert len(view.manifests) == 1 and view.manifests[0][0] == view.run_ids[0]
    assert sum(n for _, n in view.histogram) == 14  # 12 photos + 2 zip members; the error row is not a breed
    assert len(view.unsure_rows) == 14 and len(view.unsure_gallery) == 14
    probs = [row[2] for row in view.unsure_rows]
    assert probs == sorted(probs), "least sure first"
    assert all(img.shape == (*explore.THUMB_SIZE, 3) for img, _ in view.unsure_gallery)
    assert [r[1] for r in view.error_rows] == ["not an image"]
    assert view.error_rows[0][0].endswith("notes.txt") and "notes.txt" in view.error_gallery[0][1]
    assert any("photos.zip!inside/" in r[0] for r in view.unsure_rows)


def test_explorer_thumbnails_read_archive_members(label_output):
    runs = explore.open_runs(str(label_output))
    rows = [r for r in runs.table.to_pylist() if r[schema.MEMBER]] + [
        {schema.URI: str(label_output / "photos.zip"), schema.MEMBER: "missing.jpg"}]
    thumbs = explore.thumbnails(rows)
    assert [t is not None for t in thumbs] == [True, True, False]
    assert not np.array_equal(thumbs[0], placeholder("x"))


def test_explorer_filters_by_breed_and_run(label_output):
    page = ExplorerPage()
    everything = page.view(str(label_output), threshold=1.0)
    breed = everything.breeds[0]
    one = page.view(str(label_output), breed=breed, threshold=1.0)
    assert one.unsure_rows and {r[1] for r in one.unsure_rows} == {breed.replace("_", " ")}
    assert one.histogram == [(breed.replace("_", " "), sum(1 for r in everything.unsure_rows
                                                            if r[1] == breed.replace("_", " ")))]
    assert one.error_rows == [], "error rows have no breed"
    none = page.view(str(label_output), run_id="no-such-run", threshold=1.0)
    assert none.unsure_rows == [] and none.histogram == []
    strict = page.view(str(label_output), threshold=0.0)
    assert strict.unsure_rows == []


def test_explorer_hides_unfinished_runs_and_bad_uris(label_output, tmp_path):
    from core import output as out_mod
    from core.schema import FILE_SCHEMA

    staged = out_mod.Output(str(label_output))
    staged.write_part("20990101T000000Z-ffffff", out_mod.part_name(0, 0), FILE_SCHEMA.empty_table())
    assert len(ExplorerPage().view(str(label_output)).manifests) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "No finished labelling run" in ExplorerPage().view(str(empty)).status
    assert "Enter a label output" in ExplorerPage().view("  ").status
    bad = ExplorerPage().view("s3:/not a uri")
    assert bad.status.startswith("**Cannot read") or "No finished" in bad.status


def test_build_app_wires_without_launching(predictor, image_factory):
    pytest.importorskip("gradio")
    from jobs.ui import build_app

    examples = find_examples(str(image_factory.dataset(num_classes=1, images_per_class=2)), 5)
    app = build_app(ClassifyPage(predictor, 0.5), ExplorerPage(), examples, "")
    assert app.title == "breedlabel"


def test_explorer_reads_runs_and_thumbnails_from_s3(moto_s3, image_factory):
    from core import storage
    from tests.fixtures.label_output import write_label_output

    root = moto_s3.make_bucket("ui-explorer")
    photos = sorted(image_factory.dataset(num_classes=2, images_per_class=2, size=48).rglob("*.jpg"))
    uris = [f"{root}/photos/{p.name}" for p in photos]
    for uri, p in zip(uris, photos):
        storage.write_bytes(uri, p.read_bytes())
    uris.append(f"{root}/photos/gone.jpg")  # labelled once, deleted since: a placeholder, no crash
    write_label_output(f"{root}/labels", [(u, None, None) for u in uris])
    view = ExplorerPage().view(f"{root}/labels", threshold=1.0)
    assert "1 finished run" in view.status and len(view.unsure_rows) == 5
    tiles = {caption.split(" — ")[-1]: img for img, caption in view.unsure_gallery}
    assert np.array_equal(tiles.pop("gone.jpg"), placeholder("unreadable"))
    assert all(not np.array_equal(img, placeholder("unreadable")) for img in tiles.values())
