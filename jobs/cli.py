"""`breedlabel` command line: one subcommand per step, exit codes mapped in one place.

Each subcommand lives in its own module, which exposes
    add_arguments(parser: argparse.ArgumentParser) -> None
    run(args: argparse.Namespace) -> int      # the exit code
and imports heavy libraries (TensorFlow, Ray, OpenVINO) inside `run`, so `--help` is fast.
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys
from typing import Sequence

from core import console, installed_version
from core.errors import EXIT_FAILED, EXIT_LEASE_HELD, BreedlabelError
from core.stop import Stopped, ignore_signals
from jobs import ray_session

# name -> (module, one-line help). Explicit: a command exists because it is listed here.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("jobs.train", "train a breed classifier and export a bundle"),
    "tune": ("jobs.tune", "search hyperparameters with Ray Tune over distributed training runs"),
    "predict": ("jobs.predict", "print the top-k breeds of one or more images"),
    "evaluate": ("jobs.evaluate", "measure a bundle on a folder-per-class dataset"),
    "label": ("jobs.label", "label images into Parquet with a Ray Data job"),
    "review": ("jobs.review", "export the most uncertain rows of a label output as Label Studio tasks"),
    "ui": ("jobs.ui", "open a web page to classify photos and explore labelling runs"),
    "submit": ("jobs.submit", "submit a label/train/tune job to a Ray cluster (--address)"),
    "jobs": ("jobs.jobs_cmd", "status, logs, stop or list jobs on a Ray cluster"),
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show a default only where there is one and the help text does not already say it.

    A flag that takes no value (store_true/store_false/store_const) has no default worth
    printing: `--no-progress (default: True)` would read as "no progress by default".
    BooleanOptionalAction pairs print their own default (`--x, --no-x (default: False)`)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, "", [], argparse.SUPPRESS) or "default" in text or _is_flag(action):
            return text
        return super()._get_help_string(action)


def _is_flag(action: argparse.Action) -> bool:
    """An option that takes no value and whose presence alone sets it (not --x/--no-x)."""
    return action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="breedlabel", description="Train dog-breed classifiers and label large image archives with Ray.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and every library's own output (TensorFlow, Ray workers)")
    parser.add_argument("--version", action="version",
                        version=f"breedlabel {installed_version() or '(not installed)'}",
                        help="the installed version (a bundle's card records it as well)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        cmd = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip().splitlines()[0],
                             formatter_class=_HelpFormatter)
        module.add_arguments(cmd)
        cmd.set_defaults(_module=module, _parser=cmd)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """parse_args, but an unknown option is the command's error, with its usage and the option
    meant (`--bach-size` -> `--batch-size`): argparse's own names the top-level usage only."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        command: argparse.ArgumentParser = args._parser
        known = [o for action in command._actions for o in action.option_strings if o.startswith("--")]
        hints = [f"{word} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(
            word.partition("=")[0], known, n=1, cutoff=0.75)) else word for word in extra]
        command.error(f"unrecognized arguments: {' '.join(hints)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = _parse(parser, argv)
    console.configure(args.verbose)
    try:
        return _run(args)
    finally:  # after the message: a Ray this command started, shut down before Python's exit
        ray_session.shutdown_uninterruptible()


def _run(args: argparse.Namespace) -> int:
    try:
        code = int(args._module.run(args))
        sys.stdout.flush()  # a reader gone meanwhile shows here, not in Python's flush at exit
        return code
    except BreedlabelError as exc:
        if isinstance(exc, Stopped):  # stopped, and saying so: a second signal while it winds down (Ray's
            ignore_signals()  # shutdown, TensorFlow's teardown) must not turn exit 1 into 130/143
        what = "skipped" if exc.exit_code == EXIT_LEASE_HELD else "error"
        print(f"breedlabel {args.command}: {what}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        ignore_signals()
        print(f"breedlabel {args.command}: interrupted", file=sys.stderr)
        return EXIT_FAILED
    except BrokenPipeError:  # stdout's reader has gone (`| head`): stop quietly, as `cat` does
        _drop_stdout()
        return EXIT_FAILED


def _drop_stdout() -> None:
    """Point stdout at /dev/null, so Python's flush at exit does not fail on the broken pipe again
    (the recipe of the `signal` module's documentation, "Note on SIGPIPE")."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
