"""`breedlabel CMD --help` reads right: flags say what they do, defaults are not backwards, and
train's help speaks in flags, not in TrainConfig field names."""
from __future__ import annotations

import argparse

import pytest

from jobs import train as train_cli
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
    lines = _help("train")
    renamed = {opt: field for opt, field in train_cli._OVERRIDES.items() if opt != field}
    text = "\n".join(lines.values())
    for field in renamed.values():
        assert field not in text, f"train --help shows the config field {field!r}"
    assert "(preset mobilenet_v2: 39)" in lines["--finetune-layers"]
    assert "(preset mobilenet_v2: none)" in lines["--classes"]
