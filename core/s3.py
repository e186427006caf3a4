"""S3 plumbing behind core.storage: options, cached boto3 clients, error mapping, a seekable
range reader and the pyarrow S3 filesystem. Use `core.storage`; this module is its back end.

Credentials come from the standard AWS chain inside boto3 / the AWS SDK; they are never read,
passed around, logged or written here.
"""
from __future__ import annotations

import functools
import io
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator
from urllib.parse import urlparse

from core.errors import ServiceError, StorageError
from core.reasons import REASON_FORBIDDEN, REASON_NOT_A_FILE, REASON_NOT_FOUND, REASON_TOO_LARGE

READ_BUFFER_BYTES = 1 << 20  # read-ahead for remote seekable files (zip headers are tiny reads)
TAIL_BYTES = 1 << 20  # cached end of a remote seekable file: a zip's end record + central directory
_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}
_DENIED_CODES = {"AccessDenied", "403"}
_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                     "TokenRefreshRequired", "InvalidClientTokenId"}
_SERVICE_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "Throttling",
                  "500", "502", "503", "504"}
# How long a run waits for S3 before it fails (ServiceError): per request, then retried with
# backoff. A stalled endpoint fails a run after about max_attempts x (read timeout + backoff).
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 30.0
MAX_ATTEMPTS = 5


class ObjectNotFoundError(StorageError):
    """A file or object (local or S3) that does not exist, or vanished between listing and reading."""

    reason = REASON_NOT_FOUND

    def __init__(self, uri: str):
        self.uri = uri
        super().__init__(f"{uri}: not found; check the path, or whether it was deleted since listing")


class ObjectTooLargeError(StorageError):
    """An object larger than the run's cap (--max-object-mb): its row's error, never read into memory."""

    reason = REASON_TOO_LARGE

    def __init__(self, uri: str, size: int | None, limit: int):
        self.uri = uri
        size_text = f"{size:,} bytes" if size is not None else "a stream"  # a pipe or device has no size
        super().__init__(f"{uri}: {size_text}, over the {limit:,}-byte limit; raise --max-object-mb to read it")


class NotAFileError(StorageError):
    """A local path named as an object that is a directory, a pipe or a device: its row's error.
    Opening a pipe (a FIFO) blocks until something writes to it, so it is never opened."""

    reason = REASON_NOT_A_FILE

    def __init__(self, uri: str, kind: str):
        self.uri = uri
        super().__init__(f"{uri}: not a regular file ({kind}); give a file")


class ObjectForbiddenError(StorageError):
    """An object these credentials may not read (its row's error; the bucket itself answered)."""

    reason = REASON_FORBIDDEN

    def __init__(self, uri: str, detail: str = ""):
        self.uri = uri
        super().__init__(f"{uri}: access denied{f' ({detail})' if detail else ''}; check the credentials and "
                         "the bucket policy or file permissions")


@dataclass(frozen=True)
class S3Options:
    """Explicit S3 settings; unset fields fall back to the AWS environment variables (endpoint,
    region) and this module's defaults (timeouts, attempts)."""

    endpoint_url: str | None = None
    region: str | None = None
    read_timeout_s: float | None = None
    max_attempts: int | None = None

    def resolved(self) -> "S3Options":
        endpoint = self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = self.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        return S3Options(endpoint_url=endpoint or None, region=region or None,
                         read_timeout_s=self.read_timeout_s or READ_TIMEOUT_S,
                         max_attempts=self.max_attempts or MAX_ATTEMPTS)

    @property
    def endpoint(self) -> str:
        """The endpoint as a message names it: "the S3 endpoint URL" or "AWS's default S3 endpoint"."""
        url = self.resolved().endpoint_url
        return f"the S3 endpoint {url}" if url else "AWS's default S3 endpoint"

    @property
    def endpoint_check(self) -> str:
        """What to check when the endpoint does not answer: the setting that chose it, or (AWS's
        default endpoint) the network, and the variable that points elsewhere."""
        url = self.resolved().endpoint_url
        if not url:
            return "check the network (an S3-compatible store other than AWS needs AWS_ENDPOINT_URL)"
        for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
            if os.environ.get(var) == url:
                return f"check {var} and the network"
        return "check the endpoint URL and the network"


_client_lock = threading.Lock()


@functools.lru_cache(maxsize=16)
def _client(endpoint_url: str | None, region: str | None, read_timeout_s: float, max_attempts: int):
    import boto3
    from botocore.config import Config

    config = Config(retries={"max_attempts": max_attempts, "mode": "standard"},
                    connect_timeout=min(CONNECT_TIMEOUT_S, read_timeout_s), read_timeout=read_timeout_s,
                    max_pool_connections=32)
    with _client_lock:  # boto3 sessions are not thread-safe to create
        return boto3.session.Session().client("s3", endpoint_url=endpoint_url, region_name=region, config=config)


def s3_client(s3: S3Options | None = None):
    """The (cached, thread-safe) boto3 S3 client for these options."""
    opts = (s3 or S3Options()).resolved()
    return _client(opts.endpoint_url, opts.region, opts.read_timeout_s, opts.max_attempts)


def split_s3_uri(uri: str) -> tuple[str, str]:
    """s3://BUCKET/KEY -> (BUCKET, KEY). Not urlparse: '?' and '#' are legal in a key, not a query
    or a fragment."""
    bucket, _, key = uri[len("s3://"):].partition("/")
    return bucket, key  # a key may begin with "/" ("s3://b//x.jpg" is the key "/x.jpg")


def no_credentials(uri: str) -> ServiceError:
    return ServiceError(f"{uri}: no AWS credentials found; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, "
                        "or run where an instance/pod role provides them")


@contextmanager
def s3_errors(uri: str, action: str, s3: S3Options | None = None) -> Iterator[None]:
    """Map botocore failures to errors that say what to do, told apart by who is at fault:

    - the object: missing (ObjectNotFoundError) or forbidden to read (ObjectForbiddenError):
      the row's `error`, the run goes on;
    - the service: unreachable, stalled past the timeouts, 5xx or throttling after the retries,
      credentials rejected (ServiceError): the run fails, and resumes when rerun;
    - the request: no such bucket, listing forbidden (StorageError): the run fails.
    """
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    opts = (s3 or S3Options()).resolved()
    endpoint = opts.endpoint
    try:
        yield
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in _NOT_FOUND_CODES:
            raise ObjectNotFoundError(uri) from None
        if code in _DENIED_CODES and action == "read":
            raise ObjectForbiddenError(uri, code) from None
        if code == "NoSuchBucket":
            raise StorageError(f"{uri}: bucket {split_s3_uri(uri)[0]!r} does not exist at {endpoint}; "
                               "check the bucket name, the endpoint and the region") from None
        if code in _DENIED_CODES:
            raise StorageError(f"{uri}: access denied while trying to {action} ({code}); "
                               "check the credentials and the bucket policy") from None
        if code in _CREDENTIAL_CODES:
            raise ServiceError(f"{uri}: {endpoint} rejected the credentials ({code}); "
                               "check AWS_PROFILE or the role, then rerun") from None
        if code in _SERVICE_CODES:
            raise ServiceError(f"{uri}: {endpoint} failed to {action} ({code}) after "
                               f"{opts.max_attempts} attempts; rerun when it recovers") from None
        raise StorageError(f"{uri}: cannot {action}: {code or exc}") from None
    except NoCredentialsError:
        raise no_credentials(uri) from None
    except BotoCoreError as exc:  # connection refused or reset, connect/read timeouts, after the retries
        raise ServiceError(f"{uri}: {endpoint} does not answer ({type(exc).__name__}; {opts.max_attempts} "
                           f"attempts to {action}, {opts.read_timeout_s:g} s timeout each); "
                           f"{opts.endpoint_check}, then rerun") from None


class S3RangeReader(io.RawIOBase):
    """Seekable raw reader over one S3 object with HTTP range GETs (for zip's random access).

    The last `TAIL_BYTES` bytes are fetched once and kept: a zip's end record and central
    directory live there and are read in several small seeks.
    """

    def __init__(self, uri: str, bucket: str, key: str, size: int, s3: S3Options | None):
        self._uri, self._bucket, self._key, self._size, self._s3, self._pos = uri, bucket, key, size, s3, 0
        self._tail_start = max(0, size - TAIL_BYTES)
        self._tail: bytes | None = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def _get(self, offset: int, length: int) -> bytes:
        with s3_errors(self._uri, "read", self._s3):
            rng = f"bytes={offset}-{offset + length - 1}"
            return s3_client(self._s3).get_object(Bucket=self._bucket, Key=self._key, Range=rng)["Body"].read()

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self._size - self._pos)
        if n <= 0:
            return 0
        if self._pos >= self._tail_start:
            if self._tail is None:
                self._tail = self._get(self._tail_start, self._size - self._tail_start)
            start = self._pos - self._tail_start
            data = self._tail[start: start + n]
        else:
            data = self._get(self._pos, min(n, self._tail_start - self._pos))
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)


def bucket_region(bucket: str, opts: S3Options) -> str:
    if opts.endpoint_url:
        return "us-east-1"
    import pyarrow.fs as pafs

    try:
        return pafs.resolve_s3_region(bucket)
    except OSError:
        return "us-east-1"


@functools.lru_cache(maxsize=16)
def arrow_s3(endpoint_url: str | None, region: str, read_timeout_s: float = READ_TIMEOUT_S,
             max_attempts: int = MAX_ATTEMPTS):
    import pyarrow.fs as pafs

    kwargs: dict = {"region": region, "connect_timeout": min(CONNECT_TIMEOUT_S, read_timeout_s),
                    "request_timeout": read_timeout_s,
                    "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts)}
    if endpoint_url:
        parsed = urlparse(endpoint_url)
        kwargs["endpoint_override"] = parsed.netloc or endpoint_url
        kwargs["scheme"] = parsed.scheme or "https"
    return pafs.S3FileSystem(**kwargs)
