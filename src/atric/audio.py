"""Reading audio files: wav, flac, ogg through soundfile; mp3 through librosa's fallback."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import soundfile as sf

from atric.errors import DataError

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")


def load_audio(
    path: str | Path, sample_rate: int, clip_id: str | None = None, *, data: bytes | None = None
) -> np.ndarray:
    """Mono float32 waveform at ``sample_rate``; DataError naming the file/clip if unreadable or empty.

    ``data``: the file's bytes, already read by the caller (extraction hashes the very bytes it
    decodes), decoded instead of reading ``path`` again; ``path`` still names it in errors.
    """
    path = Path(path)
    what = f"{path}" + (f" (clip {clip_id!r})" if clip_id else "")
    if data is None and not path.exists():
        raise DataError(f"{what}: audio file not found")
    try:
        audio, rate = sf.read(path if data is None else io.BytesIO(data), dtype="float32", always_2d=True)
        audio = audio.mean(axis=1)
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        if data is not None and isinstance(exc, sf.LibsndfileError):  # name the file, not the buffer
            exc = sf.LibsndfileError(exc.code, f"Error opening {str(path)!r}: ")
        audio, rate = _load_fallback(path, what, exc)
    if audio.size == 0:
        raise DataError(f"{what}: audio file has zero length")
    if not np.isfinite(audio).all():
        raise DataError(f"{what}: audio contains NaN or inf samples")
    if rate != sample_rate:
        import librosa

        audio = librosa.resample(audio, orig_sr=rate, target_sr=sample_rate, res_type="soxr_hq")
    return np.ascontiguousarray(audio, dtype=np.float32)


def _load_fallback(path: Path, what: str, first_error: Exception) -> tuple[np.ndarray, int]:
    # libsndfile builds without mp3 support exist; librosa decodes through audioread then.
    if path.suffix.lower() != ".mp3":
        raise DataError(f"{what}: cannot read audio: {first_error}") from first_error
    try:
        import librosa

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            audio, rate = librosa.load(path, sr=None, mono=True)
    except Exception as exc:  # audioread raises backend-specific types
        raise DataError(f"{what}: cannot read audio: {exc}") from exc
    return audio.astype(np.float32), int(rate)


def audio_duration(path: str | Path, clip_id: str | None = None) -> float:
    """Duration in seconds from the header (no decoding) where the format allows."""
    path = Path(path)
    what = f"{path}" + (f" (clip {clip_id!r})" if clip_id else "")
    if not path.exists():
        raise DataError(f"{what}: audio file not found")
    try:
        info = sf.info(path)
        return float(info.frames) / float(info.samplerate)
    except (sf.LibsndfileError, RuntimeError, TypeError) as first_error:
        # Same rule as load_audio: only mp3 may fall back, so a file prepare accepts
        # is a file extraction can read.
        if path.suffix.lower() != ".mp3":
            raise DataError(f"{what}: cannot read audio: {first_error}") from first_error
        import librosa

        try:
            return float(librosa.get_duration(path=path))
        except Exception as exc:
            raise DataError(f"{what}: cannot read audio: {exc}") from exc
