"""One exception root for everything a user can act on.

Messages name the input, say what is wrong and what to do. The CLI maps these to exit
codes in one place (`jobs.cli`); per-image problems in a labelling run are *not* raised,
they become the row's `error` column.
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_ERROR_BUDGET = 3
# sysexits' EX_TEMPFAIL, "try again later": another run holds the output's lease (core.lease),
# so a scheduler can tell "skipped" from "failed".
EXIT_LEASE_HELD = 75


class BreedlabelError(Exception):
    """Root of every error breedlabel raises on purpose."""

    exit_code: int = EXIT_FAILED


class ConfigError(BreedlabelError):
    """A bad option, config value or combination of them."""

    exit_code = EXIT_USAGE


class InputError(BreedlabelError):
    """An input (image, dataset, URI, manifest) that cannot be used."""


class ImageDecodeError(InputError):
    """An image that cannot be decoded. `reason` is the short text for a Parquet row."""

    def __init__(self, reason: str, source: str | None = None):
        self.reason = reason
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{reason}")


class BundleError(BreedlabelError):
    """A model bundle that is missing, incomplete, inconsistent or unsafe."""


class StorageError(BreedlabelError):
    """A URI that cannot be read, listed or written."""


class ServiceError(StorageError):
    """A storage service that does not answer properly (unreachable, stalled past its timeouts,
    5xx or throttling after retries, credentials rejected): the run fails, it does not become
    rows of errors; a rerun once the service is back resumes it."""


class JobError(BreedlabelError):
    """A Ray job (train, tune, label, submit) that failed as a whole."""
