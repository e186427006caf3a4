"""`breedlabel CMD --help` reads right: flags say what they do, defaults are not backwards, and
train's help speaks in flags, not in TrainConfig field names."""
from __future__ import annotations

import argparse

import pytest

from jobs.cli import build_parser


def _help(command: str) -> dict[str, str]:
    """{each option string: its help as --help prints it, defaults filled in} of one subcommand."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    formatter = sub._get_formatter()
    return {opt: formatter._expand_help(action) if action.help else ""
            for action in sub._actions for opt in action.option_strings}


@pytest.mark.parametrize("command, flag", [
    ("label", "--no-progress"), ("label", "--no-resume"), ("label", "--incremental"), ("label", "--dry-run"),
    ("jobs", "--wait"), ("submit", "--follow"),
])
def test_flags_without_a_value_print_no_default(command, flag):
    line = _help(command)[flag]
    assert "(default:" not in line, line


def test_paired_flags_and_valued_options_keep_their_default():
    assert "(default: True)" in _help("evaluate")["--report"]
    assert "(default: 64)" in _help("label")["--batch-size"]


@pytest.mark.parametrize("command", ["predict", "evaluate", "ui"])
def test_runtime_has_help_everywhere(command):
    line = _help(command)["--runtime"]
    assert "OpenVINO" in line and "(default: auto)" in line, line


def test_train_help_speaks_in_flags():
    """Every TrainConfig option is a flag named after its field, with the preset's value in its help."""
    from core.config import TrainConfig
    from core.options import declared, flag_of

    lines = _help("train")
    for f in declared(TrainConfig):
        assert flag_of(f) in lines, f"train --help lacks {flag_of(f)} (TrainConfig.{f.name})"
    assert "(preset mobilenet_v2: 39)" in lines["--finetune-layers"]
    assert "(preset mobilenet_v2: none)" in lines["--classes"]


# Every flag these commands had before options were declared on the config dataclasses
# (issue 17); renamed ones live on as aliases.
_EARLIER_FLAGS = {
    "train": "--backbone --batch-size --checkpoint-dir --classes --config --cpus-per-worker --data --dense-units "
             "--dropout --epochs --feature-views --finetune-cached --finetune-epochs --finetune-layers --finetune-lr "
             "--gpus-per-worker --input-size --label-smoothing --lr --max-steps-per-epoch --no-finetune-cached "
             "--no-tta-flip --out --patience --per-class --preset --run-name --seed --storage --tta-flip --tta-sizes "
             "--val-fraction --view-kind --weights --workers",
    "tune": "--address --classes --config --cpus-per-worker --data --final-finetune-epochs --final-head-epochs "
            "--final-train --finetune-epochs --gpus-per-worker --grace-period --head-epochs --max-concurrent --name "
            "--no-final-train --num-cpus --num-samples --out --preset --reduction-factor --restore --searcher --seed "
            "--space --storage --time-budget-s --weights --workers",
    "label": "--actors --address --any-extension --batch-size --chunk-mb --cpus-per-actor --decode-threads "
             "--dry-run --follow-symlinks --incremental --io-attempts --io-threads --io-timeout --lease-ttl "
             "--manifest --max-error-rate --max-object-mb --min-prob --model --no-progress --no-resume --out "
             "--pipeline --relabel --rows-per-file --runtime --stage-every --summary-breeds --top-k",
}


@pytest.mark.parametrize("command", sorted(_EARLIER_FLAGS))
def test_every_earlier_flag_still_works(command):
    have = set(_help(command))
    missing = sorted(set(_EARLIER_FLAGS[command].split()) - have)
    assert not missing, f"breedlabel {command} lost {missing}"


@pytest.mark.parametrize("alias, field, value", [
    ("--epochs", "head_epochs", 3), ("--lr", "head_lr", 0.5), ("--patience", "early_stopping_patience", 2),
    ("--feature-views", "head_feature_views", 2), ("--view-kind", "head_view_kind", "mirror"),
])
def test_train_aliases_set_their_config_field(alias, field, value):
    from core.config import TrainConfig
    from core.options import values

    parser = build_parser()
    args = parser.parse_args(["train", "--data", "d", "--out", "o", alias, str(value)])
    assert values(args, TrainConfig)[field] == value


def test_tune_name_is_run_name():
    args = build_parser().parse_args(["tune", "--data", "d", "--out", "o", "--name", "search"])
    assert args.run_name == "search"


def test_version_is_the_installed_one():
    import importlib.metadata
    import subprocess
    import sys

    from tests.test_predict_cli import REPO

    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "--version"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout == f"breedlabel {importlib.metadata.version('breedlabel')}\n"
