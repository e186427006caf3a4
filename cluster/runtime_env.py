"""The Ray runtime environment breedlabel jobs run in, for `breedlabel submit` and the docs.

Three ways to get the code and its dependencies onto the nodes (`--runtime-env`):

- "upload" (default): the repo is uploaded as the job's `working_dir` (Ray unpacks it on every
  node and puts it first on `sys.path`, so the job runs the code you submit), and the
  dependencies are the ones already installed on the nodes — ray_cluster.yaml's setup
  commands install breedlabel with pyproject.toml's pins. Fast: no per-job pip.
- "upload+pip": as "upload", plus Ray installs the pinned requirements into a per-job
  virtualenv (cloned from the node's Python, so what is already there is reused). For a
  cluster whose nodes only have Ray (e.g. a stock rayproject/ray image). Slow on first use.
- "installed": nothing uploaded; the nodes' installed breedlabel runs as it is (container
  images that bake breedlabel in, the KubeRay RayJob recipe).

Never put credentials here: a runtime env is stored in the job's info and shown on the
dashboard. Nodes get S3 access from IAM roles (the standard AWS chain).
"""
from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path
from typing import Any, Mapping

from core.errors import ConfigError

MODES = ("upload", "upload+pip", "installed")
DEFAULT_MODE = "upload"
DISTRIBUTION = "breedlabel"

# gitwildmatch patterns, relative to the repo: nothing the job does not need leaves the laptop.
WORKING_DIR_EXCLUDES: tuple[str, ...] = (
    ".git", ".venv", "venv", "runs/", "out/", "artifacts/", "build/", "dist/", "test-artifacts/",
    "tests/", "bench/", ".ci/", "**/__pycache__", "*.egg-info", ".pytest_cache/",
    "*.parquet", "*.pkl", "*.pickle", "*.h5", "*.tar", "*.tar.gz", "*.tgz", "*.tar.bz2", "*.tbz2", "*.tar.xz",
    "*.tbz", "*.txz", "*.zip",
)

# Set in every job's processes (driver, tasks, actors): the contracts of DESIGN.md.
JOB_ENV_VARS: Mapping[str, str] = {"TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}

_SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|ACCESS_KEY|PRIVATE_KEY", re.I)


def repo_root() -> Path:
    """The folder holding core/, jobs/ and cluster/: what "upload" sends."""
    return Path(__file__).resolve().parents[1]


def pinned_requirements() -> list[str]:
    """breedlabel's runtime requirements exactly as pyproject.toml pins them (no extras)."""
    try:
        requires = importlib.metadata.requires(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        return _requirements_from_pyproject(repo_root() / "pyproject.toml")
    return [r for r in requires if "extra ==" not in r]


def _requirements_from_pyproject(path: Path) -> list[str]:
    import tomllib

    if not path.exists():
        raise ConfigError(f"{path}: missing, and breedlabel is not installed; "
                          "run from the repo or `pip install -e .` first")
    return list(tomllib.loads(path.read_text())["project"]["dependencies"])


def check_env_vars(env: Mapping[str, str]) -> None:
    """Refuse anything that looks like a credential: it would be stored with the job."""
    bad = sorted(name for name in env if _SECRET_NAME.search(name))
    if bad:
        raise ConfigError(
            f"--env {', '.join(bad)}: looks like a credential; a runtime env is stored in the "
            "job's info and shown on the dashboard. Give the nodes an IAM role (or a Kubernetes "
            "service account) instead; the AWS SDK finds it through the standard chain")


def build_runtime_env(mode: str = DEFAULT_MODE, *, working_dir: str | Path | None = None,
                      env_vars: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A runtime_env dict for JobSubmissionClient.submit_job (or `ray job submit --runtime-env-json`)."""
    if mode not in MODES:
        raise ConfigError(f"--runtime-env {mode!r}: unknown; use one of {', '.join(MODES)}")
    extra = dict(env_vars or {})
    check_env_vars(extra)
    env: dict[str, Any] = {"env_vars": {**JOB_ENV_VARS, **extra}}
    if mode in ("upload", "upload+pip"):
        root = Path(working_dir) if working_dir else repo_root()
        if not (root / "jobs").is_dir():
            raise ConfigError(f"{root}: not the breedlabel repo (no jobs/ folder); "
                              "run from the repo or use --runtime-env installed")
        env["working_dir"] = str(root)
        env["excludes"] = list(WORKING_DIR_EXCLUDES)
    if mode == "upload+pip":
        env["pip"] = {"packages": pinned_requirements(), "pip_check": False}
    return env
