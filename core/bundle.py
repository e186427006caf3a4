"""Export bundle: a SavedModel plus labels.json and card.json, at any URI.

The bundle is the only thing labelling, predict, evaluate and the UI read. Preprocessing
lives inside the graph (uint8 in, probabilities out); the card says the input size and the
resize policy; `model_id` ties the card to the exact model files so a tampered or partially
copied bundle is refused. Pickle is refused everywhere: a bundle may come from a bucket
anyone can write to.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from core import installed_version, storage
from core.breeds import Breed, read_labels_json, write_labels_json
from core.errors import BundleError, ConfigError

log = logging.getLogger(__name__)

MODEL_DIR = "model"
LABELS_FILE = "labels.json"
CARD_FILE = "card.json"
FORMAT_VERSION = 2  # 2: model_id covers labels.json and the card's decode settings, not only model/
FORMAT_VERSIONS = (1, 2)
SIGNATURE = "serving_default"
INPUT_NAME = "images"
OUTPUT_NAME = "probs"
DOG_SCORE_OUTPUT = "dog_score"  # float32 [N], present when the card has a `dog_score` entry
SAVED_MODEL_FILE = "saved_model.pb"
VARIABLES_INDEX = "variables/variables.index"
PICKLE_SUFFIXES = (".pkl", ".pickle")
RESIZE_POLICIES = ("resize_crop", "squash")
CACHE_ENV = "BREEDLABEL_CACHE"

# card.json keys (fixed names, one place)
CARD_FORMAT_VERSION = "format_version"
CARD_MODEL_ID = "model_id"
CARD_BACKBONE = "backbone"
CARD_INPUT_SIZE = "input_size"
CARD_RESIZE_POLICY = "resize_policy"
CARD_NUM_CLASSES = "num_classes"
CARD_TRAIN_CONFIG = "train_config"
CARD_DATA_FINGERPRINT = "data_fingerprint"
CARD_METRICS = "metrics"
CARD_CREATED_AT = "created_at"
CARD_LIBRARIES = "library_versions"
CARD_DOG_SCORE = "dog_score"  # {method, threshold, threshold_rule, ...}: the graph has a dog_score output
CARD_CALIBRATION = "calibration"  # {method, temperature, ece_before, ece_after, ...}
CARD_HASHES = "hashes"  # {"model/": sha256, "labels.json": sha256}: which file changed, when one did
# What the card says that changes a prediction: part of model_id (format 2).
PREDICTION_FIELDS = (CARD_INPUT_SIZE, CARD_RESIZE_POLICY)
_RESERVED = (CARD_FORMAT_VERSION, CARD_MODEL_ID, CARD_INPUT_SIZE, CARD_RESIZE_POLICY,
             CARD_NUM_CLASSES, CARD_CREATED_AT, CARD_LIBRARIES, CARD_HASHES)
_REQUIRED_CARD_KEYS = (CARD_FORMAT_VERSION, CARD_MODEL_ID, CARD_INPUT_SIZE, CARD_RESIZE_POLICY)


@dataclass(frozen=True)
class Bundle:
    """A loaded (local, validated) bundle. `path` is a local directory."""

    path: str
    classes: list[Breed]
    card: dict
    model_id: str

    @property
    def model_path(self) -> str:
        return os.path.join(self.path, MODEL_DIR)

    @property
    def input_size(self) -> tuple[int, int]:
        return _input_hw(self.card[CARD_INPUT_SIZE])

    @property
    def resize_policy(self) -> str:
        return str(self.card[CARD_RESIZE_POLICY])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def dog_threshold(self) -> float | None:
        """The card's not-a-dog threshold on `dog_score`; None for a bundle without a dog score."""
        entry = self.card.get(CARD_DOG_SCORE)
        return float(entry["threshold"]) if isinstance(entry, dict) and "threshold" in entry else None


def _input_hw(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return int(value[0]), int(value[1])
    raise BundleError(f"{CARD_FILE}: input_size {value!r} is neither an int nor [H, W]; re-export the bundle")


def bundle_id(model_sha256: str, labels_sha256: str, card: Mapping[str, Any]) -> str:
    """model_id (format 2): the model files, the class list and the card's decode settings, so
    that anything that changes a prediction changes the id (and an edit is refused at load)."""
    fields = {k: card[k] for k in PREDICTION_FIELDS}
    if card.get(CARD_DOG_SCORE) is not None:  # its threshold sets is_dog; absent in older bundles
        fields[CARD_DOG_SCORE] = card[CARD_DOG_SCORE]
    text = json.dumps({"model": model_sha256, "labels": labels_sha256, "card": fields}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def labels_sha256(classes: Sequence[Breed]) -> str:
    """Of the class list's content (ids and names, in order), not of the file's formatting."""
    return hashlib.sha256(json.dumps([[c.id, c.name] for c in classes]).encode()).hexdigest()


def compute_model_id(model_dir: str | Path) -> str:
    """sha256 over the sorted relative paths and bytes of every file under model/ (format 1's
    model_id; format 2 keeps it as the card's hashes["model/"])."""
    root = Path(model_dir)
    digest = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file())
    for path in files:
        rel = path.relative_to(root).as_posix().encode()
        digest.update(len(rel).to_bytes(8, "little") + rel)
        digest.update(path.stat().st_size.to_bytes(8, "little"))
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _library_versions() -> dict[str, str]:
    import numpy as np
    import tensorflow as tf

    versions = {"python": platform.python_version(), "tensorflow": tf.__version__, "numpy": np.__version__}
    if (version := installed_version()) is not None:  # None: a source tree that was not pip-installed
        versions["breedlabel"] = version
    try:
        import tf_keras

        versions["tf_keras"] = tf_keras.__version__
    except ImportError:  # the model may come from another Keras; the card says which libs exist
        pass
    return versions


def _save_serving_model(model: Any, model_dir: Path, input_size: int | tuple[int, int]) -> tuple[int, bool]:
    """Wrap the Keras model in a tf.Module with a uint8 signature and save it; returns (width C,
    whether the signature has a dog_score output)."""
    import tensorflow as tf

    height, width = _input_hw(input_size)
    spec = tf.TensorSpec([None, height, width, 3], tf.uint8, name=INPUT_NAME)

    module = tf.Module()
    module.model = model

    @tf.function(input_signature=[spec])
    def serve(images: tf.Tensor) -> dict[str, tf.Tensor]:
        out = module.model(tf.cast(images, tf.float32), training=False)
        if isinstance(out, dict):  # registry.with_tta with a dog score
            return {OUTPUT_NAME: tf.cast(out["probs"], tf.float32),
                    DOG_SCORE_OUTPUT: tf.cast(out["dog_score"], tf.float32)}
        return {OUTPUT_NAME: tf.cast(out, tf.float32)}

    module.serve = serve
    concrete = serve.get_concrete_function()
    out_width = concrete.structured_outputs[OUTPUT_NAME].shape[-1]
    tf.saved_model.save(module, str(model_dir), signatures={SIGNATURE: concrete})
    return (int(out_width) if out_width is not None else -1), DOG_SCORE_OUTPUT in concrete.structured_outputs


def _build_card(model_dir: Path, classes: Sequence[Breed], input_size: Any, resize_policy: str,
                card_extra: Mapping[str, Any]) -> dict:
    num_classes = len(classes)
    hashes = {f"{MODEL_DIR}/": compute_model_id(model_dir), LABELS_FILE: labels_sha256(classes)}
    card: dict[str, Any] = {
        CARD_FORMAT_VERSION: FORMAT_VERSION,
        CARD_HASHES: hashes,
        CARD_BACKBONE: None,
        CARD_INPUT_SIZE: input_size,
        CARD_RESIZE_POLICY: resize_policy,
        CARD_NUM_CLASSES: num_classes,
        CARD_TRAIN_CONFIG: None,
        CARD_DATA_FINGERPRINT: None,
        CARD_METRICS: None,
        CARD_CREATED_AT: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        CARD_LIBRARIES: _library_versions(),
    }
    card.update(card_extra)
    card[CARD_MODEL_ID] = bundle_id(hashes[f"{MODEL_DIR}/"], hashes[LABELS_FILE], card)
    return card


def export_bundle(model: Any, classes: Sequence[Breed], out_uri: str, *, input_size: int,
                  resize_policy: str = "resize_crop", card_extra: Mapping[str, Any] | None = None) -> Bundle:
    """Write model/ + labels.json + card.json to `out_uri` (path, file:// or s3://).

    `card_extra` carries backbone, train_config, data_fingerprint, metrics (JSON-able).
    """
    card_extra = dict(card_extra or {})
    clash = sorted(set(card_extra) & set(_RESERVED))
    if clash:
        raise ConfigError(f"export_bundle: card_extra may not set {clash}; they are computed at export")
    if resize_policy not in RESIZE_POLICIES:
        raise ConfigError(f"export_bundle: resize_policy {resize_policy!r} is not one of {list(RESIZE_POLICIES)}")
    if not classes:
        raise ConfigError("export_bundle: the class list is empty")
    remote = _is_remote(out_uri)
    if not remote:
        check_export_target(out_uri)
    local = Path(tempfile.mkdtemp(prefix="bundle-")) if remote else Path(_local_path(out_uri))
    created = not local.exists()
    local.mkdir(parents=True, exist_ok=True)
    try:
        width, has_dog_score = _save_serving_model(model, local / MODEL_DIR, input_size)
        if width != len(classes):
            raise BundleError(f"export_bundle: the model outputs {width} classes but {len(classes)} "
                              "classes were given; build the head with num_classes=len(classes)")
        if has_dog_score != (card_extra.get(CARD_DOG_SCORE) is not None):
            raise BundleError("export_bundle: a model with a dog_score output needs the card's dog_score entry "
                              "(threshold, method) and a card with one needs the output; pass both or neither")
        write_labels_json(list(classes), local / LABELS_FILE)
        card = _build_card(local / MODEL_DIR, classes, input_size, resize_policy, card_extra)
        model_id = card[CARD_MODEL_ID]
        (local / CARD_FILE).write_text(json.dumps(card, indent=2, sort_keys=True, default=str) + "\n")
        if remote:
            _upload_dir(local, out_uri)
    except BaseException:
        if not remote:  # nothing half-written stays to block the next export there
            shutil.rmtree(local / MODEL_DIR, ignore_errors=True)
            for name in (LABELS_FILE, CARD_FILE):
                (local / name).unlink(missing_ok=True)
            if created:
                with contextlib.suppress(OSError):  # only if empty: the folder was made for this bundle
                    local.rmdir()
        raise
    finally:
        if remote:
            shutil.rmtree(local, ignore_errors=True)
    log.info("exported bundle %s (model_id %s, %d classes)", out_uri, model_id[:12], len(classes))
    return Bundle(path=str(local) if not remote else out_uri, classes=list(classes), card=card, model_id=model_id)


# ---------------------------------------------------------------- URIs


def check_export_target(out_uri: str) -> None:
    """Refuse, before an hour of training, a destination the export would refuse or could not write:
    an existing bundle, a file, a folder holding other files, a place these credentials cannot write."""
    if _is_remote(out_uri):
        if storage.is_dir(out_uri):  # also fails here, not after training, on credentials or a missing bucket
            raise BundleError(f"{out_uri}: objects already exist under that prefix; export to a new location")
        probe = f"{out_uri.rstrip('/')}/.breedlabel-write-check"
        storage.write_bytes(probe, b"")
        storage.delete(probe)
        return
    path = Path(_local_path(out_uri))
    if (path / MODEL_DIR).exists():
        raise BundleError(f"{out_uri}: a bundle already exists there; export to a new location")
    if path.is_dir() and any(path.iterdir()):
        raise BundleError(f"{out_uri}: the folder holds other files; give a new or empty folder for the bundle")
    storage.check_writable_folder(str(path), "the bundle (--out)")


def _is_remote(uri: str) -> bool:
    return storage.is_s3(str(uri))


def _local_path(uri: str) -> str:
    """A local path or file:// URI as a plain path (core.storage parses and checks the scheme)."""
    return storage.parse_uri(str(uri)).path


def _upload_dir(local: Path, out_uri: str) -> None:
    base = out_uri.rstrip("/")
    # card.json last: a reader that finds the card finds the rest.
    files = sorted((p for p in local.rglob("*") if p.is_file()), key=lambda p: p.name == CARD_FILE)
    for path in files:
        storage.write_bytes(f"{base}/{path.relative_to(local).as_posix()}", path.read_bytes())


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "breedlabel"))


def _download(uri: str) -> str:
    """Copy a remote bundle into the cache (keyed by URI + card model_id) and return the dir."""
    base = uri.rstrip("/")
    infos = list(storage.list_files(base, extensions=None))
    rels = [info.uri[len(base) + 1:] for info in infos if info.uri.startswith(base + "/")]
    if not rels:
        raise BundleError(f"bundle {uri} not found or empty; check the URI (it should hold "
                          f"{MODEL_DIR}/, {LABELS_FILE} and {CARD_FILE})")
    _refuse_pickles(rels, uri)
    card_bytes = storage.read_bytes(f"{base}/{CARD_FILE}") if CARD_FILE in rels else b""
    key = hashlib.sha256(base.encode() + b"\0" + card_bytes).hexdigest()[:24]
    dest = cache_root() / "bundles" / key
    if (dest / CARD_FILE).exists():
        return str(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=_ensure(dest.parent)))
    for rel in rels:
        target = tmp / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(storage.read_bytes(f"{base}/{rel}"))
    try:
        os.replace(tmp, dest)
    except OSError:  # another process filled the cache first
        shutil.rmtree(tmp, ignore_errors=True)
    return str(dest)


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------- load + checks


def _refuse_pickles(rel_paths: Sequence[str], uri: str) -> None:
    for rel in rel_paths:
        if rel.lower().endswith(PICKLE_SUFFIXES):
            raise BundleError(f"bundle {uri}: refusing pickle file {rel} (pickle can run code); "
                              "re-export the bundle with breedlabel, which writes JSON only")


def _read_card(root: Path, uri: str) -> dict:
    try:
        card = json.loads((root / CARD_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"bundle {uri}: {CARD_FILE} is not valid JSON ({exc}); re-export the bundle") from exc
    if not isinstance(card, dict):
        raise BundleError(f"bundle {uri}: {CARD_FILE} must hold a JSON object")
    missing = [key for key in _REQUIRED_CARD_KEYS if key not in card]
    if missing:
        raise BundleError(f"bundle {uri}: {CARD_FILE} lacks {missing}; re-export the bundle")
    if card[CARD_FORMAT_VERSION] not in FORMAT_VERSIONS:
        raise BundleError(f"bundle {uri}: {CARD_FILE} format_version {card[CARD_FORMAT_VERSION]!r} is not one of "
                          f"{list(FORMAT_VERSIONS)}; use a breedlabel version that reads it or re-export")
    return card


def load_bundle(uri: str, *, verify: bool = True) -> Bundle:
    """Open and validate a bundle; s3:// bundles are downloaded to a cache dir first.

    verify=False skips re-hashing model/ against card.json model_id (faster, less safe).
    """
    root = Path(_download(uri) if _is_remote(uri) else _local_path(uri))
    if not root.is_dir():
        what = "is a file, not a bundle" if root.is_file() else "not found"
        raise BundleError(f"bundle {uri} {what} (expected a directory with {MODEL_DIR}/, "
                          f"{LABELS_FILE} and {CARD_FILE}); check --model")
    _refuse_pickles([p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()], uri)
    wanted = [CARD_FILE, LABELS_FILE, f"{MODEL_DIR}/{SAVED_MODEL_FILE}", f"{MODEL_DIR}/{VARIABLES_INDEX}"]
    missing = [rel for rel in wanted if not (root / rel).is_file()]
    if missing:
        beside = root.with_name(root.name.removesuffix(".run"))
        if root.name.endswith(".run") and (beside / CARD_FILE).is_file():  # `train --out B` writes B and B.run
            raise BundleError(f"{uri} is the training run folder (checkpoints, history) of the bundle {beside}; "
                              f"pass --model {beside}")
        raise BundleError(f"bundle {uri} is incomplete: missing {', '.join(missing)}; "
                          "re-copy or re-export the bundle")
    card = _read_card(root, uri)
    try:
        classes = read_labels_json(root / LABELS_FILE)
    except BundleError as exc:
        raise BundleError(f"bundle {uri}: {exc}") from exc
    except Exception as exc:  # InputError etc. from the labels reader
        raise BundleError(f"bundle {uri}: {LABELS_FILE} is invalid ({exc})") from exc
    n_card = card.get(CARD_NUM_CLASSES)
    if n_card is not None and int(n_card) != len(classes):
        raise BundleError(f"bundle {uri}: {LABELS_FILE} lists {len(classes)} classes but {CARD_FILE} "
                          f"says num_classes={n_card}; the files come from different exports")
    _input_hw(card[CARD_INPUT_SIZE])
    if verify:
        _verify_identity(root, card, classes, uri)
    return Bundle(path=str(root), classes=classes, card=card, model_id=str(card[CARD_MODEL_ID]))


def _verify_identity(root: Path, card: dict, classes: Sequence[Breed], uri: str) -> None:
    """The files and the card's decode settings are what model_id says, or a BundleError naming
    what changed. Format 1 bundles (exported before labels.json and the card were covered) are
    checked on model/ alone, as they always were; re-export one to protect the rest."""
    model_sha = compute_model_id(root / MODEL_DIR)
    redo = "re-copy or re-export the bundle"
    if card[CARD_FORMAT_VERSION] == 1:
        if model_sha != card[CARD_MODEL_ID]:
            raise BundleError(f"bundle {uri}: {MODEL_DIR}/ files do not match {CARD_FILE} model_id "
                              f"(tampered or partially copied); {redo}")
        log.warning("bundle %s is format 1: its model_id does not cover %s or the card's %s; re-export it to "
                    "have edits refused", uri, LABELS_FILE, "/".join(PREDICTION_FIELDS))
        return
    hashes = card.get(CARD_HASHES) or {}
    if model_sha != hashes.get(f"{MODEL_DIR}/"):
        raise BundleError(f"bundle {uri}: {MODEL_DIR}/ files do not match {CARD_FILE} (tampered or partially "
                          f"copied); {redo}")
    if labels_sha256(classes) != hashes.get(LABELS_FILE):
        raise BundleError(f"bundle {uri}: {LABELS_FILE} was changed after export (its classes would name "
                          f"predictions wrongly); {redo}")
    if bundle_id(model_sha, hashes[LABELS_FILE], card) != card[CARD_MODEL_ID]:
        fields = ", ".join([*PREDICTION_FIELDS, *([CARD_DOG_SCORE] if card.get(CARD_DOG_SCORE) is not None else [])])
        raise BundleError(f"bundle {uri}: {CARD_FILE} was edited: {fields} or model_id no longer match the exported "
                          f"model (to flag dogs at another threshold, pass --dog-threshold); {redo}")


def check_output_width(bundle: Bundle, width: int | None) -> None:
    """Called by the runtime once the graph is loaded: model output width == labels.json."""
    if width is not None and width > 0 and width != bundle.num_classes:
        raise BundleError(f"bundle {bundle.path}: {MODEL_DIR}/ outputs {width} classes but {LABELS_FILE} "
                          f"lists {bundle.num_classes}; the files come from different exports")
