"""Every command the README shows runs as written.

1. Every `breedlabel …` line of every fenced bash block parses with the real CLI parser (the
   placeholders `…`, `[…]` and CAPITALS aside): a renamed or removed flag fails here.
2. The commands that run on one machine run, in README order, verbatim in a folder whose
   `../shared` is a small copy of the real one (12 breeds x 6 training crops, 12 sample photos,
   a full scene of each of those breeds that has some, 3 cats and 3 objects, the real MobileNetV2
   weights) and whose `s3://bucket` is the test moto_server. The only
   change to a command is a budget: `--num-samples 2` appended to tune. Commands that need a
   cluster, GPUs, the internet (`--weights imagenet`) or a browser (`ray up`, `submit`, `jobs`,
   `ui`, `aws`, `make`), or data the README only names (`Images/`), are covered by their own tests
   and skipped here.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
RUNS_LOCALLY = ("train", "predict", "evaluate", "label", "review", "tune")
BUDGET = {"tune": ["--num-samples", "2"]}
TIMEOUT_S = 1200


def readme_commands() -> list[str]:
    """Every command line of the README's bash blocks, continuations joined, comments dropped."""
    text = README.read_text()
    commands = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(" ".join(line.split()))
    return commands


def breedlabel_commands() -> list[str]:
    return [c for c in readme_commands() if c.startswith("breedlabel ")]


def _is_placeholder(argv: list[str]) -> bool:
    return any(a in ("…", "...") or a.startswith("[") or re.fullmatch(r"[A-Z_]+(…)?", a) for a in argv[1:])


def _runs_here(argv: list[str]) -> bool:
    """No cluster, GPU, internet or data the README only names."""
    needs_elsewhere = ("imagenet", "--gpus-per-worker", "Images/")
    return argv[1] in RUNS_LOCALLY and not _is_placeholder(argv) and not any(a in needs_elsewhere for a in argv)


def test_the_readme_has_commands_to_check():
    names = {shlex.split(c)[1] for c in breedlabel_commands()}
    assert set(RUNS_LOCALLY) <= names and len(breedlabel_commands()) >= 10


@pytest.mark.parametrize("command", breedlabel_commands())
def test_every_readme_command_parses(command):
    from jobs.cli import build_parser

    argv = shlex.split(command)
    if _is_placeholder(argv):
        pytest.skip("a placeholder, not a command")
    try:
        build_parser().parse_args(argv[1:])
    except SystemExit as exc:
        raise AssertionError(f"README command does not parse: {command}") from exc


def _small_shared(root: Path, shared: Path) -> Path:
    """../shared with the real weights and a few real photos (symlinks)."""
    dogs = shared / "data" / "stanford_dogs_train"
    breeds = sorted(p.name for p in dogs.iterdir() if p.is_dir())[:12]
    for kind, per_class in (("stanford_dogs_train", 6), ("sample_bucket", 1), ("full_scenes", 1)):
        src_root = shared / "data" / kind
        for folder in sorted(p for p in src_root.iterdir() if p.is_dir() and p.name in breeds):
            dest = root / "data" / kind / folder.name
            dest.mkdir(parents=True)
            for photo in sorted(folder.iterdir())[:per_class]:
                (dest / photo.name).symlink_to(photo)
    for group in ("cats", "objects"):
        dest = root / "data" / "not_dogs" / group
        dest.mkdir(parents=True)
        for photo in sorted((shared / "data" / "not_dogs" / group).iterdir())[:3]:
            (dest / photo.name).symlink_to(photo)
    (root / "weights").symlink_to(shared / "weights", target_is_directory=True)
    assert dogs.exists()
    return root


def _prepare(work: Path, moto_s3) -> None:
    """What the README's commands point at beside ../shared: a photo, an archive, a URI list, a bucket."""
    photos = sorted((work.parent / "shared" / "data" / "sample_bucket").rglob("*.JPEG"))
    shutil.copy(photos[0], work / "photo.jpg")
    with tarfile.open(work / "archive.tar.gz", "w:gz", dereference=True) as tf:  # the photos are symlinks
        for p in photos[1:3]:
            tf.add(p, arcname=p.name)
    client = moto_s3.client()
    moto_s3.make_bucket("bucket")
    for p in photos[3:5]:
        client.put_object(Bucket="bucket", Key=f"photos/{p.name}", Body=p.read_bytes())
    (work / "uris.txt").write_text("".join(f"s3://bucket/photos/{p.name}\n" for p in photos[3:5]))


def _upload(local: Path, prefix: str) -> None:
    from core import storage

    for path in local.rglob("*"):
        if path.is_file():
            storage.write_bytes(f"{prefix}/{path.relative_to(local).as_posix()}", path.read_bytes())


@pytest.mark.shared_data
@pytest.mark.slow
def test_readme_commands_run_as_written(shared_dir, moto_s3, tmp_path):
    root = tmp_path / "checkout"
    work = root / "repo"
    work.mkdir(parents=True)
    _small_shared(root / "shared", shared_dir)
    _prepare(work, moto_s3)
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    ran = []
    for command in breedlabel_commands():
        argv = shlex.split(command)
        if not _runs_here(argv):
            continue
        if argv[1] == "label" and "--dry-run" in argv and not ran.count("upload"):
            _upload(work / "runs" / "mnv2", "s3://bucket/bundles/mnv2")  # the README's `aws s3 sync` step
            ran.append("upload")
        line = " ".join([command, *BUDGET.get(argv[1], [])])
        done = subprocess.run(["bash", "-c", line], cwd=work, env=env, capture_output=True, text=True,
                              timeout=TIMEOUT_S)
        assert done.returncode == 0, f"README command failed ({done.returncode}): {line}\n{done.stderr[-4000:]}"
        ran.append(argv[1])
    assert set(RUNS_LOCALLY) <= set(ran), ran
