"""One declaration per command-line option, on the config dataclass field it sets.

    batch_size: int = option(64, "images per inference call")
    stage_every_s: float = option(30.0, "stage the rows …", flag="--stage-every", metavar="S")

`add_options(parser, Config)` adds an argparse option for every field declared with `option`:
its flag (`--field-name` unless said otherwise, old names as aliases), type, choices, default and
help all come from the field, so a flag, its config field and its help cannot drift apart.
`values(args, Config)` reads them back by field name. With `preset=Config()` every option
defaults to None ("unset": the preset or a config file decides) and its help shows the preset's
value. No third-party parser: the CLI builds every command's options at start-up, and this costs
nothing to import.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import MISSING, dataclass
from typing import Any, Callable, Iterable

OPTION = "breedlabel.option"


@dataclass(frozen=True)
class _Spec:
    help: str
    flag: str | None = None
    aliases: tuple[str, ...] = ()
    choices: tuple | None = None
    metavar: str | None = None
    type: Callable | None = None
    action: str | None = None      # "append" (repeatable) or "positional"
    required: bool = False
    negatable: bool = False        # a bool with both --flag and --no-flag


def option(default: Any = MISSING, help: str = "", *, default_factory: Any = MISSING, flag: str | None = None,
           aliases: Iterable[str] = (), choices: Iterable | None = None, metavar: str | None = None,
           type: Callable | None = None, action: str | None = None, required: bool = False,
           negatable: bool = False) -> Any:
    """A dataclass field that is also a command-line option (see the module docstring)."""
    spec = _Spec(help, flag, tuple(aliases), tuple(choices) if choices is not None else None, metavar, type,
                 action, required, negatable)
    return dataclasses.field(default=default, default_factory=default_factory, metadata={OPTION: spec})


def declared(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if OPTION in f.metadata]


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata[OPTION].flag or "--" + f.name.replace("_", "-")


def add_options(parser: argparse.ArgumentParser, cls: type, *, preset: Any = None, preset_name: str = "",
                only: Iterable[str] | None = None) -> None:
    """An option for every declared field of `cls` (or the `only` ones)."""
    base = preset if preset is not None else cls()
    wanted = set(only) if only is not None else None
    for f in declared(cls):
        if wanted is not None and f.name not in wanted:
            continue
        spec: _Spec = f.metadata[OPTION]
        value = getattr(base, f.name)
        kwargs: dict[str, Any] = {"dest": f.name, "help": spec.help}
        if spec.choices is not None:
            kwargs["choices"] = spec.choices
        if spec.metavar:
            kwargs["metavar"] = spec.metavar
        if preset is not None:
            kwargs["help"] = f"{spec.help} ({preset_name or 'preset'}: {_shown(value)})"
        if spec.action == "positional":
            parser.add_argument(f.name, nargs="*", **{k: v for k, v in kwargs.items() if k != "dest"})
            continue
        names = [flag_of(f), *spec.aliases]
        if isinstance(value, bool) and preset is None and spec.negatable:
            parser.add_argument(*names, action=argparse.BooleanOptionalAction, default=value, **kwargs)
            continue
        if isinstance(value, bool) and preset is None:
            if value:  # on by default: the option turns it off
                names = ["--no-" + flag_of(f)[2:], *spec.aliases]
            parser.add_argument(*names, action="store_false" if value else "store_true", **kwargs)
            continue
        if isinstance(value, bool):
            parser.add_argument(*names, action=argparse.BooleanOptionalAction, default=None, **kwargs)
            continue
        kwargs["default"] = None if preset is not None else value
        if spec.action == "append":
            kwargs.update(action="append", default=[])
        elif isinstance(value, tuple):
            kwargs["nargs"] = "*"
        kind = spec.type or _type_of(value)
        if kind is not None:
            kwargs["type"] = kind
        parser.add_argument(*names, required=spec.required, **kwargs)


def values(args: argparse.Namespace, cls: type, *, unset: bool = True) -> dict[str, Any]:
    """{field: value} of the declared options found in `args`; `unset=False` drops the None ones
    (preset mode: what the user did not say)."""
    got = {f.name: getattr(args, f.name) for f in declared(cls) if hasattr(args, f.name)}
    got = {k: (tuple(v) if isinstance(v, list) else v) for k, v in got.items()}
    return got if unset else {k: v for k, v in got.items() if v is not None}


def positive_int(text: str) -> int:
    """argparse type of a count (threads, batch size): a whole number, at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: give a whole number, at least 1")
    return value


def _type_of(value: Any) -> Callable | None:
    if isinstance(value, tuple):
        return type(value[0]) if value else None
    return type(value) if value is not None and not isinstance(value, str) else None


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return " ".join(map(str, value)) or "none"
    return str(value)
