"""Check the cluster config and the schedule recipes before a user copies them.

    python -m jobs.cluster_check [ray_cluster.yaml] [cluster/schedules]

1. ray_cluster.yaml against the cluster-config JSON schema shipped inside the installed `ray`
   package (`ray/autoscaler/ray-schema.json`, what `ray up` itself validates with), then Ray's
   own semantic checks, then breedlabel's rules: GPU worker types scale from zero, every node
   installs breedlabel, the code is mounted, an idle timeout is set, nothing secret.
2. Every command in cluster/schedules/ (crontab lines, CronJob container commands, RayJob
   entrypoints) names an entry point that exists — a `breedlabel` subcommand, a
   `python -m` module — and its options parse with that entry point's own parser.
Prints one line per problem; exit code 1 if there is any.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import importlib.util
import io
import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

import yaml

from core import console

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "ray_cluster.yaml"
SCHEDULES_DIR = REPO / "cluster" / "schedules"
# AWS access key ids, and secret names followed by a value
_SECRETS = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b|(aws_secret_access_key|aws_session_token"
                      r"|AWS_SECRET_ACCESS_KEY|AWS_SESSION_TOKEN)\s*[:=]", re.I)
_SHELL_OPS = {"&&", "||", ";", "|", "&"}


def ray_schema_path() -> Path:
    """ray/autoscaler/ray-schema.json of the installed ray, found without importing ray."""
    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the `ray` package is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "autoscaler" / "ray-schema.json"


def load_yaml_docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def schema_errors(config: Any) -> list[str]:
    import jsonschema

    schema = json.loads(ray_schema_path().read_text())
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
            for e in sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.path)))]


def ray_semantic_errors(config: dict) -> list[str]:
    """Ray's own checks after filling provider defaults (what `ray up` runs before launching)."""
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError:  # private API moved: the schema check above still holds
        return []
    try:
        # its logger's handler holds the real stderr: the redirect alone left "setting max workers …"
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                console.quiet_logger(prepare_config.__module__):
            validate_config(prepare_config(copy.deepcopy(config)))
    except Exception as exc:  # noqa: BLE001 - report whatever Ray rejects
        return [f"ray rejects it: {exc}"]
    return []


def _is_gpu_type(node_type: dict) -> bool:
    """GPUs declared, or an AWS GPU instance family (g4dn, g5, g6, p3, p4d, p5...)."""
    if node_type.get("resources", {}).get("GPU", 0) > 0:
        return True
    instance = str(node_type.get("node_config", {}).get("InstanceType", ""))
    return re.match(r"^(g[4-6]|p[3-5])[a-z]*\.", instance) is not None


def breedlabel_rules(config: dict, text: str) -> list[str]:
    problems = []
    types = config.get("available_node_types", {})
    head = config.get("head_node_type")
    if head not in types:
        problems.append(f"head_node_type {head!r} is not one of available_node_types")
    workers = {name: t for name, t in types.items() if name != head}
    gpu = {n: t for n, t in workers.items() if _is_gpu_type(t)}
    if len(gpu) < 2:
        problems.append("expected GPU worker node types for 1-GPU and multi-GPU instances")
    for name, t in gpu.items():
        if t.get("min_workers", 0) != 0:
            problems.append(f"{name}: min_workers must be 0 (GPU nodes only while there is work)")
    if not config.get("idle_timeout_minutes"):
        problems.append("idle_timeout_minutes is not set (idle GPU nodes would keep running)")
    setup = " ".join(config.get("setup_commands", []))
    if not re.search(r"pip install .*breedlabel", setup):
        problems.append("setup_commands do not install breedlabel on every node")
    if not any(str(v) in (".", "./") for v in (config.get("file_mounts") or {}).values()):
        problems.append("file_mounts do not copy the repo ('.') to the nodes")
    if _SECRETS.search(text):
        problems.append("looks like it holds AWS credentials: use IAM instance profiles instead")
    return problems


def check_cluster_config(path: Path = CLUSTER_YAML) -> list[str]:
    try:
        text = path.read_text()
        config = yaml.safe_load(text)
    except OSError as exc:
        return [f"{path}: cannot read it ({exc.strerror or exc})"]
    except yaml.YAMLError as exc:
        return [f"{path.name}: does not parse: {' '.join(str(exc).split())}"]
    problems = schema_errors(config)
    if not problems:
        problems += ray_semantic_errors(config)
    problems += breedlabel_rules(config, text)
    return [f"{path.name}: {p}" for p in problems]


# --- schedules --------------------------------------------------------------------------------

def commands_in(path: Path) -> Iterator[list[str]]:
    """Every command line (as argv) a schedule file would run."""
    if path.suffix in (".yaml", ".yml"):
        for doc in load_yaml_docs(path):
            yield from _commands_in_doc(doc)
        return
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or re.match(r"^[A-Z_]+=", line):
            continue
        words = shlex.split(line, comments=True)
        yield from _segments(words[1:] if words[0].startswith("@") else words[5:])  # @hourly, or 5 time fields


def _commands_in_doc(doc: Any) -> Iterator[list[str]]:
    if isinstance(doc, dict):
        if "entrypoint" in doc and isinstance(doc["entrypoint"], str):
            yield from _segments(shlex.split(doc["entrypoint"]))
        if "command" in doc and isinstance(doc["command"], list):
            yield [*map(str, doc["command"]), *map(str, doc.get("args", []))]
        for value in doc.values():
            yield from _commands_in_doc(value)
    elif isinstance(doc, list):
        for value in doc:
            yield from _commands_in_doc(value)


def _segments(words: list[str]) -> Iterator[list[str]]:
    """Split a shell line on && || ; | and drop redirections and test brackets."""
    current: list[str] = []
    skip_target = False
    for word in [*words, ";"]:
        if word in _SHELL_OPS:
            if current and current[0] not in ("[", "test", "cd", "echo", "true"):
                yield current
            current = []
        elif skip_target:
            skip_target = False
        elif re.match(r"^\d?(>>?|<)(&\d)?", word):  # >> FILE, 2>&1, >FILE, < FILE
            skip_target = re.fullmatch(r"\d?(>>?|<)", word) is not None
        else:
            current.append(word)


_FLOCK_VALUE_OPTIONS = ("-E", "--conflict-exit-code", "-w", "--wait", "--timeout")


def check_command(argv: Sequence[str]) -> list[str]:
    """Problems with one command: unknown entry point, or options its parser rejects."""
    argv = list(argv)
    if argv and argv[0] == "flock":  # flock [-n -E 75 -w S …] LOCKFILE CMD...
        rest = argv[1:]
        while rest and rest[0].startswith("-"):
            takes_value = rest[0] in _FLOCK_VALUE_OPTIONS
            rest = rest[2 if takes_value else 1:]
        argv = rest[1:]
    if not argv:
        return []
    if Path(argv[0]).name == "breedlabel":
        return _check_breedlabel(argv[1:])
    if Path(argv[0]).name.startswith("python") and argv[1:2] == ["-m"]:
        return _check_module(argv[2], argv[3:])
    return [f"{shlex.join(argv)[:80]}: not a breedlabel entry point"]


def _parse(prog: str, add_arguments, args: Sequence[str]) -> list[str]:
    parser = argparse.ArgumentParser(prog=prog, exit_on_error=False)
    add_arguments(parser)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            parser.parse_args(list(args))
    except (argparse.ArgumentError, SystemExit) as exc:
        return [f"{prog}: {err.getvalue().strip().splitlines()[-1] if err.getvalue() else exc}"]
    return []


def _check_module(module: str, args: Sequence[str]) -> list[str]:
    if importlib.util.find_spec(module) is None:
        return [f"python -m {module}: no such module"]
    mod = importlib.import_module(module)
    if hasattr(mod, "add_arguments"):
        return _parse(f"python -m {module}", mod.add_arguments, args)
    return []


def _check_breedlabel(args: Sequence[str]) -> list[str]:
    from jobs.cli import COMMANDS

    if not args or args[0] not in COMMANDS:
        return [f"breedlabel {args[0] if args else ''}: no such subcommand (have: {', '.join(COMMANDS)})"]
    module_name = COMMANDS[args[0]][0]
    if args[0] != "submit":
        return _check_module(module_name, args[1:])
    from jobs import submit as submit_cli

    parser = argparse.ArgumentParser(prog="breedlabel submit")
    submit_cli.add_arguments(parser)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            ns = parser.parse_args(list(args[1:]))
    except SystemExit:
        return [f"breedlabel submit: cannot parse {shlex.join(args[1:])[:80]}"]
    job_args = submit_cli.split_args(ns)
    from cluster.submit import ENTRYPOINT_MODULES

    return _check_module(ENTRYPOINT_MODULES[ns.job], job_args)


def check_schedules(directory: Path = SCHEDULES_DIR) -> list[str]:
    problems = []
    files = sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))
    for path in files:
        found = 0
        try:
            for argv in commands_in(path):
                found += 1
                problems += [f"{path.name}: {p}" for p in check_command(argv)]
        except (yaml.YAMLError, ValueError) as exc:
            problems.append(f"{path.name}: does not parse: {exc}")
        if not found:
            problems.append(f"{path.name}: no command found")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.cluster_check", description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", type=Path, default=CLUSTER_YAML)
    parser.add_argument("schedules", nargs="?", type=Path, default=SCHEDULES_DIR)
    args = parser.parse_args(argv)
    problems = check_cluster_config(args.config) + check_schedules(args.schedules)
    for p in problems:
        print(p)
    print(f"cluster_check: {len(problems)} problem(s)", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
