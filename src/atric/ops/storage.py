"""Checkpoints and search indexes to and from S3 by URL, with retries and sha256 checks.

``upload(path, "s3://bucket/key")`` stores the file's sha256 as object metadata;
``download("s3://bucket/key", path)`` writes to a temp file beside ``path``, verifies the
sha256 and only then renames, so a failed or corrupt download never leaves a partial file.

The endpoint comes from ``AWS_ENDPOINT_URL`` (boto3's own variable) or
``MLFLOW_S3_ENDPOINT_URL`` (so the MLflow stack's setting is enough); credentials come
from the usual boto3 sources (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, profiles).

Transient failures (connection refused, timeouts, 5xx) are retried with bounded exponential
backoff; permanent ones (missing bucket or key, bad credentials) raise one ``StorageError``
at once, so a typo never turns into a retry storm.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

from atric.atomic import atomic_path
from atric.errors import AtricError
from atric.redact import redact

log = logging.getLogger(__name__)

CHECKSUM_KEY = "sha256"  # user metadata key; S3 sends it back as x-amz-meta-sha256
ENDPOINT_ENV_VARS = ("AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")
_CHUNK = 1 << 20

T = TypeVar("T")


class StorageError(AtricError):
    """An S3 transfer failed: the message names the URL and the cause."""


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff: ``attempts`` tries, delays base*2^i capped at ``max_delay``.

    Defaults (6 tries, 0.5 s doubling to 8 s: about 23 s of waiting) ride out a restarting
    S3 server; ``ATRIC_S3_ATTEMPTS`` and ``ATRIC_S3_BACKOFF`` override them.
    """

    attempts: int = 6
    base_delay: float = 0.5
    max_delay: float = 8.0

    @classmethod
    def from_env(cls) -> RetryPolicy:
        try:
            attempts = int(os.environ.get("ATRIC_S3_ATTEMPTS", cls.attempts))
            base = float(os.environ.get("ATRIC_S3_BACKOFF", cls.base_delay))
        except ValueError as exc:
            raise StorageError(f"ATRIC_S3_ATTEMPTS/ATRIC_S3_BACKOFF must be numbers: {exc}") from exc
        return cls(attempts=max(1, attempts), base_delay=max(0.0, base))

    def delay(self, failures: int) -> float:
        return min(self.max_delay, self.base_delay * (2 ** (failures - 1)))


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> ("bucket", "some/key")."""
    parsed = urlparse(url)
    key = parsed.path.lstrip("/")
    if parsed.scheme != "s3" or not parsed.netloc or not key:
        raise StorageError(f"{url}: not an s3://bucket/key URL")
    return parsed.netloc, key


def endpoint_url() -> str | None:
    for name in ENDPOINT_ENV_VARS:
        if os.environ.get(name):
            return os.environ[name]
    return None  # real AWS


def make_client(endpoint: str | None = None) -> Any:
    """A boto3 S3 client with botocore's own retries off: ``RetryPolicy`` owns retrying."""
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"max_attempts": 1, "mode": "standard"},
        connect_timeout=3,
        read_timeout=60,
        s3={"addressing_style": "path"},  # self-hosted S3 (SeaweedFS, MinIO) has no per-bucket DNS
    )
    # A fresh session each time: the default session caches credentials from the first call.
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint or endpoint_url(),
        region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        config=config,
    )


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


# Error codes that no amount of retrying fixes.
_PERMANENT_CODES = {
    "NoSuchBucket": "bucket does not exist",
    "NoSuchKey": "object does not exist",
    "404": "not found",
    "NotFound": "not found",
    "InvalidAccessKeyId": "bad credentials (unknown access key)",
    "SignatureDoesNotMatch": "bad credentials (secret key does not match)",
    "AccessDenied": "access denied",
    "403": "access denied (bad credentials or no permission)",
    "Forbidden": "access denied (bad credentials or no permission)",
    "InvalidBucketName": "invalid bucket name",
}


def _root_cause(exc: BaseException) -> BaseException:
    """boto3 wraps ClientError in S3UploadFailedError/RetriesExceededError: find the real one."""
    from botocore.exceptions import BotoCoreError, ClientError

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ClientError) or (
            isinstance(current, BotoCoreError) and type(current).__name__ != "RetriesExceededError"
        ):
            return current
        nested = getattr(current, "last_exception", None)
        current = nested or current.__cause__ or current.__context__
    return exc


def _classify(exc: BaseException) -> tuple[bool, str]:
    """(permanent?, human-readable cause)."""
    from botocore.exceptions import ClientError, NoCredentialsError, ParamValidationError

    cause = _root_cause(exc)
    if isinstance(cause, NoCredentialsError):
        return True, "no credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
    if isinstance(cause, ParamValidationError):
        return True, str(cause)
    if isinstance(cause, ClientError):
        error = cause.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code in _PERMANENT_CODES:
            return True, f"{_PERMANENT_CODES[code]} ({code})"
        if 400 <= status < 500 and status not in (408, 429):
            return True, f"{code or status}: {error.get('Message', '')}".strip()
        return False, f"{code or status}: {error.get('Message', '')}".strip()
    return False, f"{type(cause).__name__}: {cause}"


def _explain_not_found(s3: Any, bucket: str, cause: str) -> str:
    """HEAD answers a bare 404 for a missing bucket and a missing key alike: tell them apart."""
    if "(404)" not in cause and "(NotFound)" not in cause:
        return cause
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        s3.head_bucket(Bucket=bucket)
    except ClientError as exc:
        if str(exc.response.get("Error", {}).get("Code")) in ("404", "NoSuchBucket", "NotFound"):
            return f"bucket {bucket!r} does not exist (NoSuchBucket)"
        return cause
    except BotoCoreError:
        return cause
    return "object does not exist (NoSuchKey)"


def _with_retries(
    url: str, action: str, fn: Callable[[], T], policy: RetryPolicy, s3: Any, bucket: str
) -> T:
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    for attempt in range(1, policy.attempts + 1):
        try:
            return fn()
        except (BotoCoreError, ClientError, Boto3Error) as exc:
            permanent, cause = _classify(exc)
            cause = redact(cause)  # botocore puts the endpoint URL (maybe with a password) in its text
            if permanent:
                raise StorageError(f"{action} {url} failed: {_explain_not_found(s3, bucket, cause)}") from exc
            if attempt == policy.attempts:
                raise StorageError(
                    f"{action} {url} failed after {attempt} attempts: {cause} (endpoint {redact(endpoint_url() or 'AWS')})"
                ) from exc
            pause = policy.delay(attempt)
            log.warning("%s %s: %s; retry %d/%d in %.1fs", action, url, cause, attempt, policy.attempts - 1, pause)
            time.sleep(pause)
    raise AssertionError("unreachable")


def upload(
    local_path: str | os.PathLike[str],
    url: str,
    *,
    policy: RetryPolicy | None = None,
    client: Any = None,
) -> str:
    """Upload a file to ``s3://bucket/key`` with its sha256 as metadata; return the sha256.

    The local file is only read, never moved: if every attempt fails it is still there.
    """
    path = Path(local_path)
    if not path.is_file():
        raise StorageError(f"upload to {url}: {path} is not a file")
    bucket, key = parse_s3_url(url)
    policy = policy or RetryPolicy.from_env()
    s3 = client or make_client()
    digest = sha256_file(path)

    def put() -> None:
        s3.upload_file(str(path), bucket, key, ExtraArgs={"Metadata": {CHECKSUM_KEY: digest}})
        # Read back what S3 holds: a proxy that drops metadata would make later downloads unverifiable.
        stored = s3.head_object(Bucket=bucket, Key=key).get("Metadata", {}).get(CHECKSUM_KEY)
        if stored != digest:
            raise StorageError(f"upload {url}: stored checksum {stored!r} differs from local {digest}")

    _with_retries(url, "upload", put, policy, s3, bucket)
    return digest


def download(
    url: str,
    local_path: str | os.PathLike[str],
    *,
    policy: RetryPolicy | None = None,
    client: Any = None,
    verify: bool = True,
) -> str:
    """Download ``s3://bucket/key`` to ``local_path`` atomically; return the verified sha256.

    A checksum mismatch raises ``StorageError`` and leaves ``local_path`` as it was.
    ``verify=False`` accepts objects that carry no sha256 metadata (not uploaded by ``upload``).
    """
    bucket, key = parse_s3_url(url)
    policy = policy or RetryPolicy.from_env()
    s3 = client or make_client()

    def fetch() -> str:
        head = s3.head_object(Bucket=bucket, Key=key)
        expected = head.get("Metadata", {}).get(CHECKSUM_KEY)
        if verify and not expected:
            raise StorageError(
                f"download {url}: object has no {CHECKSUM_KEY} metadata to verify against "
                "(not uploaded by atric.ops.storage.upload; pass verify=False to accept it)"
            )
        with atomic_path(local_path) as tmp:
            s3.download_file(bucket, key, str(tmp))
            actual = sha256_file(tmp)
            if verify and actual != expected:
                raise StorageError(
                    f"download {url}: checksum mismatch (object says {expected}, got {actual}); "
                    f"{local_path} left unchanged"
                )
        return actual

    return _with_retries(url, "download", fetch, policy, s3, bucket)
