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
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from atric.errors import CheckpointError, ConfigError

CHUNK = 1 << 16
DEFAULT_TIMEOUT = 10.0  # seconds without a byte before giving up (offline fails this fast)


@dataclass(frozen=True)
class Source:
    url: str
    md5: str | None = None  # the publisher's md5 of the whole file
    sha256_prefix: str | None = None  # leading hex digits of the sha256 (torch.hub file names)
    checksum_source: str = ""


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


def fetch(
    name: str,
    dest: Path,
    *,
    url: str | None = None,
    sha256: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    progress: bool = True,
) -> FetchResult:
    """Download ``name``'s official weights to ``dest`` (resumable, verified, atomic).

    ``url`` replaces the official address (a mirror); the publisher's checksum still applies.
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
            bar = tqdm(
                total=total, initial=resumed, unit="B", unit_scale=True, desc=name,
                disable=not progress, file=sys.stderr,
            )  # fmt: skip
            try:
                with part.open("ab") as out:
                    while chunk := response.read(CHUNK):
                        out.write(chunk)
                        md5.update(chunk)
                        digest.update(chunk)
                        downloaded += len(chunk)
                        bar.update(len(chunk))
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
