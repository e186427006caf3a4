"""Every default of a labelling run (`breedlabel label --help` shows them), checked before anything starts.

A plain, frozen dataclass (big_vision-style): the CLI builds one from its flags, tests build
one directly, and the run manifest records it. 0 means "sized from the cluster" (core.label_plan).
"""
from __future__ import annotations

from dataclasses import dataclass

from core.errors import ConfigError
from core.lease import DEFAULT_TTL_S
from core.options import option
from core.runtime import RUNTIMES
from core.s3 import S3Options

PIPELINES = ("auto", "fused", "two-stage")


@dataclass(frozen=True)
class LabelConfig:
    """One `breedlabel label` run."""

    inputs: tuple[str, ...] = option((), "folders, file:// or s3:// prefixes, images (.jpg .jpeg .png .gif .webp .bmp; "
                                     ".avif .heic .heif get their row too), .tar(.gz/.bz2/.xz)/.tgz/.tbz(2)/.txz/.zip "
                                     "archives",
                                     action="positional", metavar="INPUT")
    model: str = option("", "bundle directory or URI", flag="--model", metavar="BUNDLE", required=True)
    out: str = option("", "output folder or s3:// prefix", metavar="OUTPUT")
    manifests: tuple[str, ...] = option(
        (), "a list of objects: .txt (one URI a line; - = those lines on standard input), .csv/.parquet (a uri "
        "column, or S3 Inventory's bucket, key, e_tag) or an S3 Inventory manifest.json; repeatable",
        flag="--manifest", action="append", metavar="FILE")
    any_extension: bool = option(False, "also label keys without an image extension")
    runtime: str = option("auto", "auto = OpenVINO on CPU actors, TensorFlow on GPU actors", choices=RUNTIMES)
    pipeline: str = option("auto", "fused = decode threads inside the predict actor; two-stage = decode tasks then "
                           "predict actors; auto = fused on CPU, two-stage with GPUs", choices=PIPELINES)
    batch_size: int = option(64, "images per inference call (and per unit of work)")
    actors: int = option(0, "predict actors (0 = one per node on CPU, one per GPU)")
    cpus_per_actor: int = option(0, "CPUs each CPU actor holds (0 = all CPUs of the smallest node)")
    decode_threads: int = option(0, "decode threads per actor (0 = the actor's CPUs)")
    io_threads: int = option(8, "concurrent reads per actor (S3 latency)")
    io_timeout_s: float = option(30.0, "seconds an S3 request may take; after --io-attempts tries the run fails "
                                 "(exit 1, resumable): a dead or frozen endpoint is never a row error",
                                 flag="--io-timeout", metavar="S")
    io_attempts: int = option(5, "tries per S3 request, with backoff")
    max_object_mb: float = option(64.0, "larger objects and archive members get an error row (too large) and are "
                                  "never read", metavar="MB")
    chunk_mb: float = option(64.0, "archive-member bytes per unit of work: bounds the bytes in flight", metavar="MB")
    follow_symlinks: bool = option(False, "also list symlinked directories (each directory once); files behind "
                                   "symlinks are always listed")
    rows_per_file: int = option(20_000, "at most N rows per Parquet part (a part is also staged every --stage-every "
                                "seconds: raise that for fewer, larger files)", metavar="N")
    stage_every_s: float = option(30.0, "stage the rows received at least every S seconds (0 = after every batch): "
                                  "the most a kill can lose", flag="--stage-every", metavar="S")
    top_k: int = option(3, "breeds kept per image")
    min_prob: float = option(0.5, "top-1 probability below which an image counts as low confidence")
    dog_threshold: float | None = option(None, "dog_score below which a row gets is_dog = false (default: the "
                                         "bundle card's threshold)", type=float, metavar="SCORE")
    summary_breeds: int = option(5, "breeds listed in the closing summary (the manifest keeps them all)", metavar="N")
    max_error_rate: float = option(1.0, "exit code 3 when the share of rows with an error exceeds this")
    relabel: bool = option(False, "label again inputs a finished run already labelled with this model (readers then "
                           "see one row per run for them; by default they are skipped)")
    resume: bool = option(True, "start a new run instead of resuming an interrupted one with the same inputs and model")
    dry_run: bool = option(False, "list what would be labelled, label nothing")
    lease_ttl_s: float = option(DEFAULT_TTL_S, "the output's lease lifetime, renewed every S/3 while the run works",
                                flag="--lease-ttl", metavar="S")
    address: str | None = option(None, "Ray cluster address ('auto'); default: RAY_ADDRESS, else a local Ray", type=str)
    queue_chunks: int = 8             # units of work listed ahead of the pipeline
    progress: bool = option(True, "no progress bar")

    def check(self) -> None:
        """Usage errors (exit 2) before anything starts."""
        if not self.inputs and not self.manifests:
            raise ConfigError("give at least one INPUT (folder, s3:// prefix, archive, image) or --manifest FILE")
        if not self.model:
            raise ConfigError("--model BUNDLE is required (a bundle directory or URI)")
        if not self.out and not self.dry_run:
            raise ConfigError("--out OUTPUT is required (a folder or s3:// prefix for the Parquet)")
        if self.dog_threshold is not None and not 0.0 <= self.dog_threshold <= 1.0:
            raise ConfigError(f"--dog-threshold {self.dog_threshold}: give a score between 0 and 1")
        for name in ("batch_size", "rows_per_file", "top_k", "io_threads", "queue_chunks", "io_attempts"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{_flag(name)} must be at least 1, got {getattr(self, name)}")
        if self.summary_breeds < 0:
            raise ConfigError(f"--summary-breeds must be 0 (none) or more, got {self.summary_breeds}")
        for name in ("actors", "cpus_per_actor", "decode_threads"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{_flag(name)} must be 0 (auto) or more, got {getattr(self, name)}")
        if not self.stage_every_s >= 0:  # nan too
            raise ConfigError(f"--stage-every must be 0 (after every batch) or more seconds, got {self.stage_every_s}")
        if not 0.0 <= self.min_prob <= 1.0:
            raise ConfigError(f"--min-prob {self.min_prob}: give a probability between 0 and 1")
        for name in ("io_timeout_s", "max_object_mb", "chunk_mb"):
            if not getattr(self, name) > 0:  # nan too
                raise ConfigError(f"--{_flag(name)} must be more than 0, got {getattr(self, name)}")
        if not self.lease_ttl_s >= 3:
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
