"""Downloading the official pretrained weights of the experts that need a file (``src/fetch_weights.py``).

The download goes to ``<checkpoint>.part`` beside the path in params.yaml
(``features.<expert>.checkpoint``) and resumes from it with an HTTP Range request;
the file is verified against the publisher's checksum (and a user-given ``--sha256``)
and only then renamed into place, so the checkpoint path never holds a partial or
unverified file. A failed checksum deletes the partial file.

Sources and checksums (one table, ``SOURCES``):
- PANNs (Kong et al.), Zenodo record 3987831 (https://zenodo.org/record/3987831), which
  lists an md5 per file. The two md5s below are as transcribed from that record in
  ``Labbeti/dcase2022task6a`` (``dcase2022task6a/nn/urls.py``, "Hash type: md5"; Cnn14's
  also in ``Labbeti/dcase2021task6``); this machine has no internet, so they were not
  re-read from Zenodo itself.
- VGGish, harritaylor/torchvggish release v0.1: torch.hub names the file after the first
  8 hex digits of its sha256 (``vggish-10086976.pth``), which torch.hub checks; that
  prefix is the only hash the port publishes.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from atric.errors import CheckpointError, ConfigError

CHUNK = 1 << 16
DEFAULT_TIMEOUT = 10.0  # seconds without a byte before giving up (offline fails this fast)
# A download that stays under MIN_RATE bytes/s over its whole time after the first
# RATE_GRACE_SECONDS (a server trickling a byte every few seconds never hits the per-read
# timeout), or that runs past DEFAULT_DEADLINE, is stopped; what it wrote stays resumable.
MIN_RATE = 10_000
RATE_GRACE_SECONDS = 30.0
DEFAULT_DEADLINE = 3 * 3600.0


@dataclass(frozen=True)
class Source:
    url: str
    md5: str | None = None  # the publisher's md5 of the whole file
    sha256_prefix: str | None = None  # leading hex digits of the sha256 (torch.hub file names)
    checksum_source: str = ""
    # No file of it is larger: a body past this (or a Content-Length above it) is refused, so an
    # endless or mistaken response cannot fill the disk. Generous: the files are 5-330 MB.
    max_bytes: int = 512 << 20


SOURCES: dict[str, Source] = {
    "panns_cnn10": Source(
        "https://zenodo.org/record/3987831/files/Cnn10_mAP%3D0.380.pth?download=1",
        md5="bfb1f1f9968938fa8ef4012b8471f5f6",
        checksum_source="Zenodo record 3987831 (via Labbeti/dcase2022task6a nn/urls.py)",
    ),
    "panns_cnn14": Source(
        "https://zenodo.org/record/3987831/files/Cnn14_mAP%3D0.431.pth?download=1",
        md5="541141fa2ee191a88f24a3219fff024e",
        checksum_source="Zenodo record 3987831 (via Labbeti/dcase2022task6a nn/urls.py)",
    ),
    "vggish": Source(
        "https://github.com/harritaylor/torchvggish/releases/download/v0.1/vggish-10086976.pth",
        sha256_prefix="10086976",
        checksum_source="torch.hub file-name hash of harritaylor/torchvggish v0.1",
    ),
}


@dataclass
class FetchResult:
    path: Path
    downloaded_bytes: int  # in this run (0: already in place)
    resumed_from: int  # bytes of an earlier partial download that were kept
    sha256: str


def _hashes(path: Path | None) -> tuple[Any, Any]:
    """md5 and sha256 objects fed with ``path``'s bytes so far (empty for None)."""
    md5, sha256 = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    if path is not None and path.exists():
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                md5.update(chunk)
                sha256.update(chunk)
    return md5, sha256


def _check(name: str, source: Source, md5: str, sha256: str, user_sha256: str | None) -> str | None:
    """None if every checksum we know matches, else what does not."""
    if source.md5 and md5 != source.md5:
        return f"md5 {md5} != {source.md5} published by {source.checksum_source}"
    if source.sha256_prefix and not sha256.startswith(source.sha256_prefix):
        return f"sha256 {sha256} does not start with {source.sha256_prefix} ({source.checksum_source})"
    if user_sha256 and sha256 != user_sha256.lower():
        return f"sha256 {sha256} != --sha256 {user_sha256}"
    return None


def _open_part(part: Path) -> Any:
    """``part`` for appending, never through a symbolic link put there meanwhile (O_NOFOLLOW)."""
    try:
        fd = os.open(part, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        raise CheckpointError(f"{part}: cannot write ({exc.strerror}; a link?); remove it to download again") from exc
    return os.fdopen(fd, "ab")


def _check_bounds(dest: Path, part: Path, source: Source, size: int, downloaded: int, seconds: float,
                  deadline: float, min_rate: float) -> None:  # fmt: skip
    """CheckpointError when a download has grown past its source's size or is too slow."""
    if size > source.max_bytes:
        part.unlink(missing_ok=True)  # past any real file of it: nothing worth resuming
        raise CheckpointError(f"{dest}: the download passed {source.max_bytes} bytes, more than any such file; nothing kept")
    if seconds > deadline:
        raise CheckpointError(f"{dest}: download still running after {deadline:.0f} s; rerun to resume from {part}")
    if seconds > RATE_GRACE_SECONDS and downloaded / seconds < min_rate:
        raise CheckpointError(
            f"{dest}: download too slow ({downloaded / seconds:.0f} B/s over {seconds:.0f} s, below {min_rate:.0f}); "
            f"rerun to resume from {part}"
        )


def fetch(
    name: str,
    dest: Path,
    *,
    url: str | None = None,
    sha256: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    progress: bool = True,
    deadline: float = DEFAULT_DEADLINE,
    min_rate: float = MIN_RATE,
) -> FetchResult:
    """Download ``name``'s official weights to ``dest`` (resumable, verified, atomic).

    ``url`` replaces the official address (a mirror); the publisher's checksum still applies.
    Bounded: at most the source's ``max_bytes`` in all, ``deadline`` seconds, and on average
    ``min_rate`` bytes/s after the first ``RATE_GRACE_SECONDS``; ``<dest>.part`` is never
    followed if it is a symbolic link.
    Raises CheckpointError with a one-line message (naming ``dest`` and where to get the
    file by hand) when the download fails or the file does not verify.
    """
    if name not in SOURCES:
        raise ConfigError(f"no download known for {name!r}; known: {', '.join(SOURCES)}")
    source = SOURCES[name]
    if not (source.md5 or source.sha256_prefix or sha256):
        raise ConfigError(f"{name}: no published checksum; pass --sha256")
    url = url or source.url
    by_hand = f"download {source.url} on a connected machine and put it at {dest}"
    if dest.is_file():
        md5, digest = _hashes(dest)
        problem = _check(name, source, md5.hexdigest(), digest.hexdigest(), sha256)
        if problem is None:
            return FetchResult(dest, 0, 0, digest.hexdigest())
        raise CheckpointError(f"{dest}: exists but does not verify ({problem}); remove it to download again")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    if part.is_symlink() or (part.exists() and not part.is_file()):
        raise CheckpointError(f"{part}: not a regular file (a link?); remove it to download again")
    resumed = part.stat().st_size if part.exists() else 0
    md5, digest = _hashes(part)
    downloaded = 0
    request = urllib.request.Request(url, headers={"User-Agent": "atric-fetch-weights"})
    if resumed:
        request.add_header("Range", f"bytes={resumed}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code != 416 or not resumed:  # 416: the partial file already holds every byte
            raise CheckpointError(
                f"{dest}: download of {url} failed: HTTP {exc.code} {exc.reason}; {by_hand}"
            ) from exc
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise CheckpointError(f"{dest}: cannot download {url} ({reason}); {by_hand}") from exc
    else:
        with response:
            if resumed and response.status != 206:  # the server ignored the Range: start over
                resumed = 0
                md5, digest = _hashes(None)
                part.unlink()
            length = response.headers.get("Content-Length")
            total = resumed + int(length) if length and length.isdigit() else None
            if total is not None and total > source.max_bytes:
                raise CheckpointError(
                    f"{dest}: {url} declares {total} bytes, more than any {name} file ({source.max_bytes}); "
                    f"nothing downloaded; {by_hand}"
                )
            bar = tqdm(
                total=total, initial=resumed, unit="B", unit_scale=True, desc=name,
                disable=not progress, file=sys.stderr,
            )  # fmt: skip
            started = time.monotonic()
            try:
                with _open_part(part) as out:
                    # read1: what has arrived, so the bounds below are checked however slow the server.
                    while chunk := response.read1(CHUNK):
                        out.write(chunk)
                        md5.update(chunk)
                        digest.update(chunk)
                        downloaded += len(chunk)
                        bar.update(len(chunk))
                        _check_bounds(dest, part, source, resumed + downloaded, downloaded,
                                      time.monotonic() - started, deadline, min_rate)  # fmt: skip
            except (TimeoutError, OSError, http.client.HTTPException) as exc:
                raise CheckpointError(
                    f"{dest}: download interrupted after {resumed + downloaded} bytes ({exc}); "
                    f"rerun to resume from {part}"
                ) from exc
            finally:
                bar.close()
            if total is not None and resumed + downloaded < total:
                raise CheckpointError(
                    f"{dest}: download interrupted at {resumed + downloaded} of {total} bytes; "
                    f"rerun to resume from {part}"
                )
    problem = _check(name, source, md5.hexdigest(), digest.hexdigest(), sha256)
    if problem is not None:
        part.unlink(missing_ok=True)
        raise CheckpointError(f"{dest}: downloaded file does not verify ({problem}); nothing kept")
    os.replace(part, dest)
    return FetchResult(dest, downloaded, resumed, digest.hexdigest())
