"""core.breeds: the 120-class tuple, folder-name parsing and labels.json round-trip/validation."""
from __future__ import annotations

import io
import os

import pytest

from core.breeds import STANFORD_DOGS, Breed, parse_class_dir, read_labels_json, write_labels_json
from core.errors import BundleError


def test_stanford_dogs_has_120_unique_sorted_classes():
    assert len(STANFORD_DOGS) == 120
    assert len({b.id for b in STANFORD_DOGS}) == 120
    folders = [b.folder for b in STANFORD_DOGS]
    assert folders == sorted(folders)
    assert STANFORD_DOGS[0] == Breed("n02085620", "Chihuahua")


@pytest.mark.shared_data
def test_stanford_dogs_matches_shared_folders(stanford_dogs_dir):
    names = sorted(n for n in os.listdir(stanford_dogs_dir) if not n.startswith("."))
    assert [b.folder for b in STANFORD_DOGS] == names
    assert [parse_class_dir(n) for n in names] == list(STANFORD_DOGS)


def test_parse_class_dir():
    assert parse_class_dir("n02085782-Japanese_spaniel") == Breed("n02085782", "Japanese_spaniel")
    assert parse_class_dir("n02085782-Japanese_spaniel").display == "Japanese spaniel"
    assert parse_class_dir("cats") == Breed("cats", "cats")
    assert parse_class_dir("cats").folder == "cats"
    assert parse_class_dir("n02086240-Shih-Tzu").name == "Shih-Tzu"


def test_labels_json_round_trip(tmp_path):
    breeds = list(STANFORD_DOGS[:5]) + [Breed("cats", "cats")]
    path = tmp_path / "labels.json"
    write_labels_json(breeds, path)
    assert read_labels_json(path) == breeds
    assert read_labels_json(str(path)) == breeds
    assert read_labels_json(path.read_text()) == breeds
    assert read_labels_json(path.read_bytes()) == breeds
    buf = io.StringIO()
    write_labels_json(breeds, buf)
    assert read_labels_json(io.StringIO(buf.getvalue())) == breeds


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("[{\"id\": 1", "not valid JSON"),
        ("{\"id\": \"a\", \"name\": \"b\"}", "non-empty list"),
        ("[]", "non-empty list"),
        ("[{\"id\": \"a\"}]", "entry 0"),
        ("[{\"id\": \"a\", \"name\": 3}]", "entry 0"),
        ("[{\"id\": \"a\", \"name\": \"x\"}, {\"id\": \"a\", \"name\": \"y\"}]", "appears twice"),
    ],
)
def test_malformed_labels_json_is_a_clear_error(text, fragment):
    with pytest.raises(BundleError, match=fragment):
        read_labels_json(text)


def test_missing_labels_file(tmp_path):
    with pytest.raises(BundleError, match="cannot read labels file"):
        read_labels_json(tmp_path / "nope.json")
