"""Every default of a labelling run (`breedlabel label --help` shows them), checked before anything starts.

A plain, frozen dataclass (big_vision-style): the CLI builds one from its flags, tests build
one directly, and the run manifest records it. 0 means "sized from the cluster" (core.label_plan).
"""
from __future__ import annotations

from dataclasses import dataclass

from core.errors import ConfigError
from core.lease import DEFAULT_TTL_S
from core.runtime import RUNTIMES
from core.s3 import S3Options

PIPELINES = ("auto", "fused", "two-stage")


@dataclass(frozen=True)
class LabelConfig:
    """One `breedlabel label` run."""

    inputs: tuple[str, ...] = ()
    model: str = ""
    out: str = ""
    manifests: tuple[str, ...] = ()
    any_extension: bool = False       # also label keys without an image extension
    runtime: str = "auto"             # auto = OpenVINO on CPU actors, TensorFlow on GPU actors
    pipeline: str = "auto"            # auto = decode fused into CPU actors, two stages with GPUs
    batch_size: int = 64              # images per inference call (and per listing chunk)
    actors: int = 0                   # 0: one per node (CPU) or one per GPU
    cpus_per_actor: int = 0           # 0: all CPUs of the smallest node (CPU actors)
    decode_threads: int = 0           # 0: the actor's CPUs
    io_threads: int = 8               # concurrent reads per actor (S3 latency)
    io_timeout_s: float = 30.0        # per S3 request; a stalled endpoint fails the run after ~attempts x this
    io_attempts: int = 5              # S3 attempts per request (backoff between), then the run fails
    max_object_mb: float = 64.0       # larger objects and archive members: an error row, never read
    chunk_mb: float = 64.0            # archive-member bytes per listing chunk (bounds the bytes in flight)
    follow_symlinks: bool = False     # follow symlinked directories (each directory listed once)
    rows_per_file: int = 20_000       # target rows per Parquet part
    stage_every_s: float = 30.0       # stage what arrived at least this often: the most a kill loses
    top_k: int = 3
    min_prob: float = 0.5             # below: counted as low confidence in the summary
    summary_breeds: int = 5           # breeds the closing summary lists (the manifest has every one)
    max_error_rate: float = 1.0       # above: exit code 3 (rows are still written)
    relabel: bool = False             # label again what a finished run already labelled (duplicates!)
    resume: bool = True               # continue an interrupted run with the same inputs and model
    dry_run: bool = False
    lease_ttl_s: float = DEFAULT_TTL_S  # the output's lease, renewed every ttl/3 while running
    address: str | None = None        # Ray address ("auto" = running cluster); none = local Ray
    queue_chunks: int = 8             # listing chunks buffered ahead of the pipeline
    progress: bool = True

    def check(self) -> None:
        """Usage errors (exit 2) before anything starts."""
        if not self.inputs and not self.manifests:
            raise ConfigError("give at least one INPUT (folder, s3:// prefix, archive, image) or --manifest FILE")
        if not self.model:
            raise ConfigError("--model BUNDLE is required (a bundle directory or URI)")
        if not self.out and not self.dry_run:
            raise ConfigError("--out OUTPUT is required (a folder or s3:// prefix for the Parquet)")
        for name in ("batch_size", "rows_per_file", "top_k", "io_threads", "queue_chunks", "io_attempts"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{_flag(name)} must be at least 1, got {getattr(self, name)}")
        for name in ("actors", "cpus_per_actor", "decode_threads", "stage_every_s", "summary_breeds"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{_flag(name)} must be 0 (auto) or more, got {getattr(self, name)}")
        for name in ("io_timeout_s", "max_object_mb", "chunk_mb"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{_flag(name)} must be more than 0, got {getattr(self, name)}")
        if self.lease_ttl_s < 3:
            raise ConfigError(f"--lease-ttl must be at least 3 seconds (renewed every ttl/3), got {self.lease_ttl_s}")
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise ConfigError(f"--max-error-rate must be between 0 and 1, got {self.max_error_rate}")
        if self.runtime not in RUNTIMES:
            raise ConfigError(f"--runtime {self.runtime!r} is not one of {list(RUNTIMES)}")
        if self.pipeline not in PIPELINES:
            raise ConfigError(f"--pipeline {self.pipeline!r} is not one of {list(PIPELINES)}")


    @property
    def s3(self) -> S3Options:
        """The run's S3 settings: every read, listing and write of the run uses them."""
        return S3Options(read_timeout_s=self.io_timeout_s, max_attempts=self.io_attempts)

    @property
    def max_object_bytes(self) -> int:
        return int(self.max_object_mb * (1 << 20))

    @property
    def chunk_bytes(self) -> int:
        return int(self.chunk_mb * (1 << 20))


def _flag(name: str) -> str:
    return {"stage_every_s": "stage-every", "io_timeout_s": "io-timeout", "lease_ttl_s": "lease-ttl"}.get(
        name, name.replace("_", "-"))
