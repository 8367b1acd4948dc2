"""src/fetch_weights.py against a local HTTP server on 127.0.0.1 (never the internet):
an interrupted download resumes with a Range request, a wrong checksum is refused and
nothing is kept, the checkpoint path never holds a partial file, offline fails fast (exit 2)."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from atric.errors import CheckpointError
from atric.features import weights
from atric.features.weights import Source, fetch

ROOT = Path(__file__).resolve().parents[1]
PAYLOAD = os.urandom(300_000)


class _Server(http.server.ThreadingHTTPServer):
    cut_after: int | None = None  # close the connection after this many body bytes (once)
    ignore_range = False
    endless = False  # a body without Content-Length that never ends
    trickle = False  # one byte every 0.2 s
    ranges: list[str | None]


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        header = self.headers.get("Range")
        self.server.ranges.append(header)
        if self.server.endless or self.server.trickle:
            self.send_response(200)
            self.end_headers()
            with contextlib.suppress(OSError):  # the client hangs up
                for _ in range(100_000):
                    self.wfile.write(b"x" if self.server.trickle else b"x" * 65536)
                    self.wfile.flush()
                    if self.server.trickle:
                        time.sleep(0.2)
            return
        start = 0
        if header and not self.server.ignore_range:
            start = int(header.removeprefix("bytes=").split("-")[0])
            if start >= len(PAYLOAD):
                self.send_response(416)
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        else:
            self.send_response(200)
        body = PAYLOAD[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.server.cut_after is not None:
            body, self.server.cut_after = body[: self.server.cut_after], None
            self.wfile.write(body)
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)


@pytest.fixture
def server() -> Iterator[_Server]:
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.ranges = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def fixture_source(monkeypatch: pytest.MonkeyPatch) -> str:
    name = "fixture"
    monkeypatch.setitem(
        weights.SOURCES,
        name,
        Source("unused", md5=hashlib.md5(PAYLOAD).hexdigest(), checksum_source="the test"),
    )
    return name


def url(server: _Server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/weights.pth"


def test_interrupted_download_resumes(tmp_path: Path, server: _Server, fixture_source: str) -> None:
    dest = tmp_path / "pretrained" / "weights.pth"
    part = dest.with_name("weights.pth.part")
    server.cut_after = 120_000
    with pytest.raises(CheckpointError, match=r"interrupted at 120000 of 300000 bytes; rerun to resume"):
        fetch(fixture_source, dest, url=url(server), progress=False)
    assert not dest.exists() and part.stat().st_size == 120_000  # never a partial file at dest
    result = fetch(fixture_source, dest, url=url(server), progress=False)
    assert server.ranges == [None, "bytes=120000-"]
    assert (result.resumed_from, result.downloaded_bytes) == (120_000, 180_000)
    assert dest.read_bytes() == PAYLOAD and not part.exists()
    assert result.sha256 == hashlib.sha256(PAYLOAD).hexdigest()
    # Already in place: verified, not downloaded again.
    again = fetch(fixture_source, dest, url=url(server), progress=False)
    assert again.downloaded_bytes == 0 and len(server.ranges) == 2


def test_server_ignoring_range_restarts_cleanly(tmp_path: Path, server: _Server, fixture_source: str) -> None:
    dest = tmp_path / "weights.pth"
    dest.with_name("weights.pth.part").write_bytes(b"stale bytes from elsewhere")
    server.ignore_range = True
    result = fetch(fixture_source, dest, url=url(server), progress=False)
    assert result.resumed_from == 0 and dest.read_bytes() == PAYLOAD


def test_wrong_checksum_is_refused(
    tmp_path: Path, server: _Server, fixture_source: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "weights.pth"
    monkeypatch.setitem(
        weights.SOURCES, fixture_source, Source("unused", md5="0" * 32, checksum_source="the test")
    )
    with pytest.raises(
        CheckpointError, match=r"does not verify \(md5 .* != 0{32} published by the test\); nothing kept"
    ):
        fetch(fixture_source, dest, url=url(server), progress=False)
    assert list(tmp_path.iterdir()) == []
    # The publisher's md5 matches but the user's sha256 does not.
    monkeypatch.setitem(
        weights.SOURCES,
        fixture_source,
        Source("unused", md5=hashlib.md5(PAYLOAD).hexdigest(), checksum_source="t"),
    )
    with pytest.raises(CheckpointError, match="!= --sha256 " + "a" * 64):
        fetch(fixture_source, dest, url=url(server), sha256="a" * 64, progress=False)
    assert list(tmp_path.iterdir()) == []
    # A file already at dest that does not verify is reported, not overwritten.
    dest.write_bytes(b"something else")
    with pytest.raises(CheckpointError, match="exists but does not verify"):
        fetch(fixture_source, dest, url=url(server), progress=False)
    assert dest.read_bytes() == b"something else"


def test_vggish_checks_the_published_sha256_prefix(tmp_path: Path, server: _Server) -> None:
    # The fixture is not the real file, so the torch.hub hash prefix 10086976 refuses it.
    with pytest.raises(CheckpointError, match="does not start with 10086976"):
        fetch("vggish", tmp_path / "vggish.pth", url=url(server), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_offline_fails_fast_with_a_one_line_hint(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dest = tmp_path / "Cnn14.pth"
    proc = subprocess.run(
        [sys.executable, "src/fetch_weights.py", "panns_cnn14", "--dest", str(dest), "--url",
         f"http://127.0.0.1:{port}/Cnn14.pth", "--timeout", "3"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {dest}: cannot download"), proc.stderr
    assert "zenodo.org/record/3987831" in lines[0] and f"put it at {dest}" in lines[0]
    assert not dest.exists() and not dest.with_name("Cnn14.pth.part").exists()


def test_default_destination_is_the_params_checkpoint(tmp_path: Path, server: _Server) -> None:
    dest = tmp_path / "w" / "Cnn10.pth"
    proc = subprocess.run(
        [sys.executable, "src/fetch_weights.py", "panns_cnn10", "--no-progress", "--url", url(server),
         "--set", f"features.panns_cnn10.checkpoint={dest}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    # The fixture is not Cnn10's file: refused by the Zenodo md5, at the params path.
    assert proc.returncode == 2 and f"error: {dest}: downloaded file does not verify" in proc.stderr
    assert "bfb1f1f9968938fa8ef4012b8471f5f6" in proc.stderr
    assert not any(dest.parent.iterdir())


def test_an_endless_body_is_cut_at_the_sources_size_and_nothing_is_kept(
    tmp_path: Path, server: _Server, fixture_source: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No Content-Length and no end: the download stops past the largest such file (2.2 GB was
    written in 20 s before)."""
    monkeypatch.setitem(weights.SOURCES, fixture_source, weights.SOURCES[fixture_source].__class__(
        "unused", md5=hashlib.md5(PAYLOAD).hexdigest(), max_bytes=2_000_000))
    server.endless = True
    dest = tmp_path / "weights.pth"
    with pytest.raises(CheckpointError, match=r"passed 2000000 bytes, more than any such file; nothing kept"):
        fetch(fixture_source, dest, url=url(server), progress=False)
    assert not dest.exists() and not dest.with_name("weights.pth.part").exists()


def test_a_trickling_server_is_given_up_on_below_the_minimum_rate(
    tmp_path: Path, server: _Server, fixture_source: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One byte every 0.2 s never trips the per-read timeout; the average rate does."""
    monkeypatch.setattr(weights, "RATE_GRACE_SECONDS", 1.0)
    server.trickle = True
    dest = tmp_path / "weights.pth"
    started = time.monotonic()
    with pytest.raises(CheckpointError, match=r"download too slow \(\d+ B/s over \d+ s, below 1000\); rerun to resume"):
        fetch(fixture_source, dest, url=url(server), progress=False, min_rate=1000)
    assert time.monotonic() - started < 10


def test_a_part_file_that_is_a_symlink_is_not_written_through(
    tmp_path: Path, server: _Server, fixture_source: str
) -> None:
    target = tmp_path / "elsewhere.txt"
    target.write_text("keep me")
    dest = tmp_path / "weights.pth"
    dest.with_name("weights.pth.part").symlink_to(target)
    with pytest.raises(CheckpointError, match=r"weights\.pth\.part: not a regular file \(a link\?\)"):
        fetch(fixture_source, dest, url=url(server), progress=False)
    assert target.read_text() == "keep me" and server.ranges == []
