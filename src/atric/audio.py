"""Reading audio files: wav, flac, ogg through soundfile; mp3 through librosa's fallback."""

from __future__ import annotations

import contextlib
import io
import os
import stat
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import soundfile as sf

from atric.errors import DataError

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")


# libsndfile decodes mp3 itself since 1.1; librosa (audioread) is the fallback only where it cannot.
LIBSNDFILE_MP3 = "MP3" in sf.available_formats()
_STDERR_LOCK = threading.Lock()


@contextlib.contextmanager
def _decoder_messages(path: Path) -> Iterator[list[str]]:
    """For mp3: what the C decoder (libmpg123 inside libsndfile) prints on fd 2 ("Note: Illegal
    Audio-MPEG-Header ...") is taken off the terminal and handed back as lines: a decode failure
    names its real reason, and a stream shorter than its header says is found (truncation)."""
    messages: list[str] = []
    if path.suffix.lower() != ".mp3":
        yield messages
        return
    with _STDERR_LOCK, tempfile.TemporaryFile() as capture:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(capture.fileno(), 2)
        try:
            yield messages
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read(64 * 1024).decode("utf-8", "replace")
            messages.extend(line.strip() for line in text.splitlines() if line.strip())


def _reason(exc: BaseException, path: Path, messages: Sequence[str] = ()) -> str:
    """A decoder's error as a reason a person can act on (never empty)."""
    text = str(exc).strip()
    prefix = f"Error opening {str(path)!r}:"
    text = text[len(prefix):].strip() if text.startswith(prefix) else text
    if "does not exist or is not a regular file" in text and path.is_file():
        # libsndfile's words for "no decoder recognises these bytes", said of a file that exists.
        text = f"not a readable {path.suffix.lstrip('.') or 'audio'} file (unknown format or a damaged header)"
    truncated = _truncation(path, messages) if path.is_file() else None
    if truncated:
        return truncated
    notes = [m for m in messages if not m.lower().startswith(("note: trying to resync", "note: hit end"))]
    if notes:
        note = notes[0].split(":", 1)[-1].strip().rstrip(".")  # "Note: Illegal ..." -> "Illegal ..."
        text += f" (decoder: {note})"
    return text or type(exc).__name__


def _truncation(path: Path, messages: Sequence[str] = ()) -> str | None:
    """Why ``path`` holds less audio than its header declares, or None: a WAV whose data chunk
    runs past the end of the file, an mp3 whose stream is shorter than its Xing header says."""
    if any("stream size off" in m for m in messages):
        return "truncated: the mp3 stream is shorter than its header declares"
    if path.suffix.lower() != ".wav":
        return None
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        position = 12
        while position + 8 <= size:
            fh.seek(position)
            chunk, length = fh.read(4), int.from_bytes(fh.read(4), "little")
            if chunk == b"data":
                available = size - position - 8
                # 0 and 0xFFFFFFFF: streamed writers that never went back to fill in the size.
                if length not in (0, 0xFFFFFFFF) and length > available:
                    return (
                        f"truncated: its header declares {length} bytes of audio, the file holds "
                        f"{available} ({100 * available / length:.0f}%)"
                    )
                return None
            position += 8 + length + (length & 1)
    return None


def check_audio_file(path: Path, what: str) -> None:
    """DataError unless ``path`` is a regular file: a FIFO would block the decoder forever, a
    device would be read without end, a directory cannot be audio. Checked before opening."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise DataError(f"{what}: audio file not found") from None
    except OSError as exc:
        raise DataError(f"{what}: cannot read audio: {exc.strerror}") from exc
    if not stat.S_ISREG(mode):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a directory" if stat.S_ISDIR(mode) else "a device or socket"
        raise DataError(f"{what}: not a regular file ({kind}); give an audio file")


def load_audio(
    path: str | Path, sample_rate: int, clip_id: str | None = None, *, data: bytes | None = None
) -> np.ndarray:
    """Mono float32 waveform at ``sample_rate``; DataError naming the file/clip if unreadable,
    empty or shorter than its header declares (truncated).

    ``data``: the file's bytes, already read by the caller (extraction hashes the very bytes it
    decodes), decoded instead of reading ``path`` again; ``path`` still names it in errors.
    """
    path = Path(path)
    what = f"{path}" + (f" (clip {clip_id!r})" if clip_id else "")
    if data is None:
        check_audio_file(path, what)
    with _decoder_messages(path) as messages:
        try:
            with sf.SoundFile(path if data is None else io.BytesIO(data)) as audio_file:
                declared, rate = audio_file.frames, audio_file.samplerate
                audio = audio_file.read(dtype="float32", always_2d=True).mean(axis=1)
            error: Exception | None = None
        except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
            error = exc
    if error is not None:
        audio, rate = _load_fallback(path, what, error, messages)
    else:
        truncated = _truncation(path, messages) if data is None else None
        if truncated is None and 0 < audio.shape[0] < declared:
            truncated = f"truncated: {audio.shape[0]} of the {declared} frames its header declares could be decoded"
        if truncated:
            raise DataError(f"{what}: {truncated}")
    if audio.size == 0:
        raise DataError(f"{what}: audio file has zero length")
    if not np.isfinite(audio).all():
        raise DataError(f"{what}: audio contains NaN or inf samples")
    if rate != sample_rate:
        import librosa

        audio = librosa.resample(audio, orig_sr=rate, target_sr=sample_rate, res_type="soxr_hq")
    return np.ascontiguousarray(audio, dtype=np.float32)


def _load_fallback(path: Path, what: str, first_error: Exception, messages: Sequence[str]) -> tuple[np.ndarray, int]:
    # libsndfile builds without mp3 support exist; librosa decodes through audioread then.
    if path.suffix.lower() != ".mp3" or LIBSNDFILE_MP3:
        raise DataError(f"{what}: cannot read audio: {_reason(first_error, path, messages)}") from first_error
    try:
        import librosa

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            audio, rate = librosa.load(path, sr=None, mono=True)
    except Exception as exc:  # audioread raises backend-specific types
        raise DataError(f"{what}: cannot read audio: {_reason(exc, path)}") from exc
    return audio.astype(np.float32), int(rate)


def audio_duration(path: str | Path, clip_id: str | None = None) -> float:
    """Duration in seconds from the header (no decoding) where the format allows; DataError
    naming the file/clip if it is missing, unreadable or truncated (a WAV's data chunk runs
    past the end of the file, an mp3 stream is shorter than its header)."""
    path = Path(path)
    what = f"{path}" + (f" (clip {clip_id!r})" if clip_id else "")
    check_audio_file(path, what)
    with _decoder_messages(path) as messages:
        try:
            info = sf.info(path)
            error: Exception | None = None
        except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
            error = exc
    if error is None:
        truncated = _truncation(path, messages)
        if truncated:
            raise DataError(f"{what}: {truncated}")
        return float(info.frames) / float(info.samplerate)
    # Same rule as load_audio: only mp3 may fall back, so a file prepare accepts
    # is a file extraction can read.
    if path.suffix.lower() != ".mp3" or LIBSNDFILE_MP3:
        raise DataError(f"{what}: cannot read audio: {_reason(error, path, messages)}") from error
    import librosa

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(librosa.get_duration(path=path))
    except Exception as exc:
        raise DataError(f"{what}: cannot read audio: {_reason(exc, path)}") from exc
