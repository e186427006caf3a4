"""The class list: Stanford Dogs' 120 breeds and the labels.json format every bundle carries.

A class is a `Breed(id, name)`: for Stanford Dogs the WordNet id ("n02085620") and the folder
suffix as is ("Chihuahua", "Japanese_spaniel"); for any other folder-per-class dataset both are
the folder name. labels.json is plain JSON (never pickle: a bundle may come from a bucket
anyone can write to).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterable

from core.errors import BundleError

_WNID_DIR = re.compile(r"^(n\d{8})-(.+)$")


@dataclass(frozen=True)
class Breed:
    """One class. `name` is kept exactly as in the folder; use `display` for people."""

    id: str
    name: str

    @property
    def display(self) -> str:
        return self.name.replace("_", " ")

    @property
    def folder(self) -> str:
        """The folder name this class was read from ("n02085620-Chihuahua" or "cats")."""
        return self.name if self.id == self.name else f"{self.id}-{self.name}"


def parse_class_dir(name: str) -> Breed:
    """"n02085620-Chihuahua" -> Breed("n02085620", "Chihuahua"); "cats" -> Breed("cats", "cats")."""
    match = _WNID_DIR.match(name)
    if match:
        return Breed(match.group(1), match.group(2))
    return Breed(name, name)


def write_labels_json(breeds: Iterable[Breed], path_or_file: str | os.PathLike | IO[str]) -> None:
    """Write the ordered class list as `[{"id": ..., "name": ...}, ...]`."""
    text = json.dumps([{"id": b.id, "name": b.name} for b in breeds], indent=1, ensure_ascii=False)
    if hasattr(path_or_file, "write"):
        path_or_file.write(text + "\n")  # type: ignore[union-attr]
    else:
        Path(path_or_file).write_text(text + "\n", encoding="utf-8")  # type: ignore[arg-type]


def read_labels_json(text_or_path: str | bytes | os.PathLike | IO[str]) -> list[Breed]:
    """Read and validate labels.json (given as its text, bytes, a path or an open file)."""
    source, text = _labels_text(text_or_path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BundleError(f"{source}: not valid JSON ({exc}); expected "
                          '[{"id": ..., "name": ...}, ...] as written by export_bundle') from None
    return _validate_labels(data, source)


def _labels_text(text_or_path: str | bytes | os.PathLike | IO[str]) -> tuple[str, str]:
    if hasattr(text_or_path, "read"):
        data = text_or_path.read()  # type: ignore[union-attr]
        return getattr(text_or_path, "name", "labels.json"), data.decode("utf-8") if isinstance(data, bytes) else data
    if isinstance(text_or_path, bytes):
        return "labels.json", text_or_path.decode("utf-8", errors="replace")
    if isinstance(text_or_path, str) and text_or_path.lstrip().startswith(("[", "{")):
        return "labels.json", text_or_path
    path = Path(text_or_path)  # type: ignore[arg-type]
    try:
        return str(path), path.read_text(encoding="utf-8")
    except OSError as exc:
        raise BundleError(f"{path}: cannot read labels file ({exc.strerror or exc})") from None


def _validate_labels(data: object, source: str) -> list[Breed]:
    fix = 'expected a non-empty list of {"id": str, "name": str}; re-export the bundle'
    if not isinstance(data, list) or not data:
        raise BundleError(f"{source}: {fix}")
    breeds: list[Breed] = []
    seen: set[str] = set()
    for i, item in enumerate(data):
        if not isinstance(item, dict) or not all(isinstance(item.get(k), str) and item.get(k) for k in ("id", "name")):
            raise BundleError(f"{source}: entry {i} is {item!r}; {fix}")
        if item["id"] in seen:
            raise BundleError(f"{source}: class id {item['id']!r} appears twice (entry {i}); {fix}")
        seen.add(item["id"])
        breeds.append(Breed(item["id"], item["name"]))
    return breeds


# The 120 Stanford Dogs classes in official order (sorted folder names of Images/).
STANFORD_DOGS: tuple[Breed, ...] = (
    Breed("n02085620", "Chihuahua"),
    Breed("n02085782", "Japanese_spaniel"),
    Breed("n02085936", "Maltese_dog"),
    Breed("n02086079", "Pekinese"),
    Breed("n02086240", "Shih-Tzu"),
    Breed("n02086646", "Blenheim_spaniel"),
    Breed("n02086910", "papillon"),
    Breed("n02087046", "toy_terrier"),
    Breed("n02087394", "Rhodesian_ridgeback"),
    Breed("n02088094", "Afghan_hound"),
    Breed("n02088238", "basset"),
    Breed("n02088364", "beagle"),
    Breed("n02088466", "bloodhound"),
    Breed("n02088632", "bluetick"),
    Breed("n02089078", "black-and-tan_coonhound"),
    Breed("n02089867", "Walker_hound"),
    Breed("n02089973", "English_foxhound"),
    Breed("n02090379", "redbone"),
    Breed("n02090622", "borzoi"),
    Breed("n02090721", "Irish_wolfhound"),
    Breed("n02091032", "Italian_greyhound"),
    Breed("n02091134", "whippet"),
    Breed("n02091244", "Ibizan_hound"),
    Breed("n02091467", "Norwegian_elkhound"),
    Breed("n02091635", "otterhound"),
    Breed("n02091831", "Saluki"),
    Breed("n02092002", "Scottish_deerhound"),
    Breed("n02092339", "Weimaraner"),
    Breed("n02093256", "Staffordshire_bullterrier"),
    Breed("n02093428", "American_Staffordshire_terrier"),
    Breed("n02093647", "Bedlington_terrier"),
    Breed("n02093754", "Border_terrier"),
    Breed("n02093859", "Kerry_blue_terrier"),
    Breed("n02093991", "Irish_terrier"),
    Breed("n02094114", "Norfolk_terrier"),
    Breed("n02094258", "Norwich_terrier"),
    Breed("n02094433", "Yorkshire_terrier"),
    Breed("n02095314", "wire-haired_fox_terrier"),
    Breed("n02095570", "Lakeland_terrier"),
    Breed("n02095889", "Sealyham_terrier"),
    Breed("n02096051", "Airedale"),
    Breed("n02096177", "cairn"),
    Breed("n02096294", "Australian_terrier"),
    Breed("n02096437", "Dandie_Dinmont"),
    Breed("n02096585", "Boston_bull"),
    Breed("n02097047", "miniature_schnauzer"),
    Breed("n02097130", "giant_schnauzer"),
    Breed("n02097209", "standard_schnauzer"),
    Breed("n02097298", "Scotch_terrier"),
    Breed("n02097474", "Tibetan_terrier"),
    Breed("n02097658", "silky_terrier"),
    Breed("n02098105", "soft-coated_wheaten_terrier"),
    Breed("n02098286", "West_Highland_white_terrier"),
    Breed("n02098413", "Lhasa"),
    Breed("n02099267", "flat-coated_retriever"),
    Breed("n02099429", "curly-coated_retriever"),
    Breed("n02099601", "golden_retriever"),
    Breed("n02099712", "Labrador_retriever"),
    Breed("n02099849", "Chesapeake_Bay_retriever"),
    Breed("n02100236", "German_short-haired_pointer"),
    Breed("n02100583", "vizsla"),
    Breed("n02100735", "English_setter"),
    Breed("n02100877", "Irish_setter"),
    Breed("n02101006", "Gordon_setter"),
    Breed("n02101388", "Brittany_spaniel"),
    Breed("n02101556", "clumber"),
    Breed("n02102040", "English_springer"),
    Breed("n02102177", "Welsh_springer_spaniel"),
    Breed("n02102318", "cocker_spaniel"),
    Breed("n02102480", "Sussex_spaniel"),
    Breed("n02102973", "Irish_water_spaniel"),
    Breed("n02104029", "kuvasz"),
    Breed("n02104365", "schipperke"),
    Breed("n02105056", "groenendael"),
    Breed("n02105162", "malinois"),
    Breed("n02105251", "briard"),
    Breed("n02105412", "kelpie"),
    Breed("n02105505", "komondor"),
    Breed("n02105641", "Old_English_sheepdog"),
    Breed("n02105855", "Shetland_sheepdog"),
    Breed("n02106030", "collie"),
    Breed("n02106166", "Border_collie"),
    Breed("n02106382", "Bouvier_des_Flandres"),
    Breed("n02106550", "Rottweiler"),
    Breed("n02106662", "German_shepherd"),
    Breed("n02107142", "Doberman"),
    Breed("n02107312", "miniature_pinscher"),
    Breed("n02107574", "Greater_Swiss_Mountain_dog"),
    Breed("n02107683", "Bernese_mountain_dog"),
    Breed("n02107908", "Appenzeller"),
    Breed("n02108000", "EntleBucher"),
    Breed("n02108089", "boxer"),
    Breed("n02108422", "bull_mastiff"),
    Breed("n02108551", "Tibetan_mastiff"),
    Breed("n02108915", "French_bulldog"),
    Breed("n02109047", "Great_Dane"),
    Breed("n02109525", "Saint_Bernard"),
    Breed("n02109961", "Eskimo_dog"),
    Breed("n02110063", "malamute"),
    Breed("n02110185", "Siberian_husky"),
    Breed("n02110627", "affenpinscher"),
    Breed("n02110806", "basenji"),
    Breed("n02110958", "pug"),
    Breed("n02111129", "Leonberg"),
    Breed("n02111277", "Newfoundland"),
    Breed("n02111500", "Great_Pyrenees"),
    Breed("n02111889", "Samoyed"),
    Breed("n02112018", "Pomeranian"),
    Breed("n02112137", "chow"),
    Breed("n02112350", "keeshond"),
    Breed("n02112706", "Brabancon_griffon"),
    Breed("n02113023", "Pembroke"),
    Breed("n02113186", "Cardigan"),
    Breed("n02113624", "toy_poodle"),
    Breed("n02113712", "miniature_poodle"),
    Breed("n02113799", "standard_poodle"),
    Breed("n02113978", "Mexican_hairless"),
    Breed("n02115641", "dingo"),
    Breed("n02115913", "dhole"),
    Breed("n02116738", "African_hunting_dog"),
)
