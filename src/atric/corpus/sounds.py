"""Procedural sound renderers for the synthetic corpus: one function per event type.

Every event type has its own spectro-temporal signature (pitched, harmonic, noisy, pulsed,
sweeping, decaying ...) and random within-type variation (pitch, rate, timbre), so that a
type is a family of sounds rather than one template. Renderers are pure numpy/scipy and
draw all randomness from the generator they are given, which keeps the corpus deterministic.
The words captions use for each type are data: ``events.yaml`` (read by ``atric.corpus.events``).

Why one module of this size: 27 renderers of one short function each.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import numpy as np

# scipy.signal is imported inside the functions that filter: training imports this module
# (atric.order -> corpus.captions -> corpus.events) but never renders a sound.

Renderer = Callable[[np.random.Generator, int, int], np.ndarray]
EVENT_RMS = 0.2


# ---------------------------------------------------------------- DSP helpers
def _clamp_freq(freq: np.ndarray | float, sr: int) -> np.ndarray | float:
    # Keep every partial below Nyquist whatever data.sample_rate is (>= 8 kHz).
    return np.clip(freq, 20.0, 0.45 * sr)


def _phase(freq: np.ndarray | float, n: int, sr: int) -> np.ndarray:
    freq = np.broadcast_to(np.asarray(_clamp_freq(freq, sr), dtype=np.float64), (n,))
    return 2 * np.pi * np.cumsum(freq) / sr


def _sos(kind: str, cutoff: float | Sequence[float], sr: int, order: int = 2) -> np.ndarray:
    nyq_safe = 0.45 * sr
    # Cutoffs are quantised to 10 Hz so the (slow) filter design is cached across events.
    if isinstance(cutoff, (int, float)):
        return _butter(kind, (round(min(max(cutoff, 20.0), nyq_safe), -1),), sr, order)
    lo, hi = (float(c) for c in cutoff)
    lo = min(max(lo, 20.0), nyq_safe * 0.9)
    return _butter(kind, (round(lo, -1), round(min(max(hi, lo * 1.1), nyq_safe), -1)), sr, order)


@functools.lru_cache(maxsize=4096)
def _butter(kind: str, cutoff: tuple[float, ...], sr: int, order: int) -> np.ndarray:
    from scipy import signal
    return signal.butter(
        order, cutoff[0] if len(cutoff) == 1 else list(cutoff), btype=kind, fs=sr, output="sos"
    )


def _filter(x: np.ndarray, kind: str, cutoff: float | Sequence[float], sr: int, order: int = 2) -> np.ndarray:
    from scipy import signal
    return signal.sosfilt(_sos(kind, cutoff, sr, order), x)


# A standard 3-pole/3-zero "pinking" filter: within ~0.05 dB of 1/f from 10 Hz up, and far
# cheaper than shaping a spectrum with an FFT of the whole clip.
_PINK_B = (0.049922035, -0.095993537, 0.050612699, -0.004408786)
_PINK_A = (1.0, -2.494956002, 2.017265875, -0.522189400)


def pink_noise(rng: np.random.Generator, n: int) -> np.ndarray:
    """1/f noise, unit RMS."""
    from scipy import signal
    pink = signal.lfilter(_PINK_B, _PINK_A, rng.standard_normal(n))
    return pink / max(float(np.sqrt(np.mean(pink**2))), 1e-12)


def _smooth_random(rng: np.random.Generator, n: int, sr: int, rate_hz: float) -> np.ndarray:
    """A slowly varying positive curve around 1 (gusts, rumble fluctuation)."""
    points = max(2, int(n / sr * rate_hz) + 2)
    knots = rng.uniform(0.2, 1.0, points)
    return np.interp(np.linspace(0, points - 1, n), np.arange(points), knots)


def _place(
    n: int, starts: Sequence[int], grain: np.ndarray, gains: Sequence[float] | None = None
) -> np.ndarray:
    """Add ``grain`` at each start sample (cropped at the end)."""
    out = np.zeros(n)
    for k, start in enumerate(starts):
        if start >= n:
            continue
        stop = min(n, start + grain.size)
        out[start:stop] += grain[: stop - start] * (1.0 if gains is None else gains[k])
    return out


def _pulse_starts(
    rng: np.random.Generator, n: int, sr: int, rate_hz: float, jitter: float = 0.1
) -> list[int]:
    """Roughly periodic onsets; always at least one, at the start, so short events still sound."""
    period = sr / rate_hz
    count = max(1, int(n / period))
    return [0] + [int(k * period + rng.uniform(-jitter, jitter) * period) for k in range(1, count)]


def _decay(n: int, sr: int, tau: float) -> np.ndarray:
    return np.exp(-np.arange(n) / (tau * sr))


def _harmonic(f0: np.ndarray | float, n: int, sr: int, weights: Sequence[float]) -> np.ndarray:
    phase = _phase(f0, n, sr)
    f0_max = float(np.max(f0))
    out = np.zeros(n)
    for h, w in enumerate(weights, start=1):
        if h * f0_max < 0.45 * sr:
            out += w * np.sin(h * phase)
    return out


def _fade(x: np.ndarray, sr: int, seconds: float = 0.01) -> np.ndarray:
    # Raised-cosine edges: an event never starts or stops with a click of its own.
    k = min(int(seconds * sr), x.size // 2)
    if k > 0:
        ramp = 0.5 - 0.5 * np.cos(np.linspace(0, np.pi, k))
        x[:k] *= ramp
        x[-k:] *= ramp[::-1]
    return x


# ---------------------------------------------------------------- renderers
# Each takes (rng, n_samples, sample_rate) and returns float64 [n]; level is normalised later.
def _dog_bark(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    f0 = rng.uniform(350, 650)
    formant = rng.uniform(800, 1500)
    bark_len = int(rng.uniform(0.1, 0.18) * sr)
    m = np.arange(bark_len)
    contour = f0 * (1.0 - 0.3 * m / bark_len)  # barks fall in pitch
    weights = [np.exp(-((((h * f0) - formant) / 700.0) ** 2)) + 0.25 / h for h in range(1, 10)]
    bark = _harmonic(contour, bark_len, sr, weights)
    bark += 0.15 * rng.standard_normal(bark_len)
    bark *= np.minimum(1.0, m / (0.01 * sr)) * _decay(bark_len, sr, 0.06)
    return _place(n, _pulse_starts(rng, n, sr, rng.uniform(2.2, 3.8), 0.2), bark, rng.uniform(0.6, 1.0, 64))


def _cat_meow(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    meow_len = min(n, int(rng.uniform(0.45, 0.9) * sr))
    u = np.linspace(0, 1, meow_len)
    f0 = rng.uniform(400, 650) * (1 + 0.45 * np.sin(np.pi * u**0.7))
    formant = 2200 - 1400 * u  # "mee-ow": the bright formant moves down
    out = np.zeros(meow_len)
    phase = _phase(f0, meow_len, sr)
    for h in range(1, 8):
        out += np.exp(-(((h * f0 - formant) / 900.0) ** 2)) * np.sin(h * phase)
    out *= np.sin(np.pi * u) ** 0.8
    return _place(n, _pulse_starts(rng, n, sr, rng.uniform(0.8, 1.2), 0.1), out)


def _bird_song(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    chirp_len = int(rng.uniform(0.03, 0.06) * sr)
    u = np.linspace(0, 1, chirp_len)
    f_hi, f_lo = rng.uniform(3500, 5500), rng.uniform(2000, 3000)
    direction = rng.choice([1, -1])
    freq = f_lo + (f_hi - f_lo) * (u if direction > 0 else 1 - u)
    chirp = np.sin(_phase(freq, chirp_len, sr)) * np.sin(np.pi * u)
    trill = _place(n, _pulse_starts(rng, n, sr, rng.uniform(9, 18), 0.05), chirp)
    # Phrases with pauses: the trill is gated by a slow on/off pattern.
    gate = np.sin(2 * np.pi * rng.uniform(0.5, 1.2) * np.arange(n) / sr + rng.uniform(0, np.pi)) > -0.4
    return trill * gate


def _frog_croak(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    croak_len = min(n, int(rng.uniform(0.2, 0.4) * sr))
    f0 = rng.uniform(120, 260)
    rasp = rng.uniform(25, 45)  # the croak is a fast train of glottal pulses
    m = np.arange(croak_len)
    croak = _harmonic(f0, croak_len, sr, [1, 0.8, 0.6, 0.5, 0.3, 0.2])
    croak *= (0.5 + 0.5 * np.sign(np.sin(2 * np.pi * rasp * m / sr))) * np.sin(np.pi * m / croak_len)
    return _place(n, _pulse_starts(rng, n, sr, rng.uniform(1.5, 2.5), 0.1), croak)


_VOWELS = ((730, 1090), (270, 2290), (300, 870), (530, 1840), (660, 1720), (490, 1350), (400, 2000))


def _speech(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    base = rng.uniform(100, 230)
    t = np.arange(n) / sr
    contour = base * (1.1 - 0.2 * t / max(t[-1], 1e-3) + 0.08 * np.sin(2 * np.pi * rng.uniform(0.5, 1.5) * t))
    phase = _phase(contour, n, sr)
    source = ((phase / (2 * np.pi)) % 1.0) * 2 - 1  # sawtooth-like glottal source
    rate = rng.uniform(3.0, 5.5)
    syllable = max(1, int(sr / rate))
    out = np.zeros(n)
    for start in range(0, n, syllable):
        stop = min(n, start + syllable)
        f1, f2 = _VOWELS[rng.integers(len(_VOWELS))]
        seg = source[start:stop]
        voiced = _filter(seg, "bandpass", (f1 * 0.8, f1 * 1.2), sr) + 0.6 * _filter(
            seg, "bandpass", (f2 * 0.85, f2 * 1.15), sr
        )
        if rng.random() < 0.3:  # a fricative consonant at the syllable start
            k = min(stop - start, int(0.04 * sr))
            voiced[:k] += 0.3 * _filter(rng.standard_normal(k), "highpass", 3000, sr)
        out[start:stop] = voiced * np.sin(np.pi * np.linspace(0, 1, stop - start)) ** 0.6
    return out


def _applause(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    from scipy import signal
    claps = np.zeros(n)
    count = int(n / sr * rng.uniform(120, 300)) + 1
    np.add.at(claps, rng.integers(0, n, count), rng.uniform(0.3, 1.0, count))
    kernel = rng.standard_normal(int(0.003 * sr)) * _decay(int(0.003 * sr), sr, 0.001)
    out = _filter(signal.oaconvolve(claps, kernel)[:n], "bandpass", (600, rng.uniform(5000, 7000)), sr)
    ramp = np.minimum(1.0, np.arange(n) / (0.3 * sr)) * np.minimum(1.0, (n - np.arange(n)) / (0.3 * sr))
    return out * ramp


def _footsteps(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    step_len = int(rng.uniform(0.05, 0.09) * sr)
    cutoff = rng.uniform(500, 1400)
    heel = _filter(rng.standard_normal(step_len), "lowpass", cutoff, sr) * _decay(step_len, sr, 0.015)
    toe_delay = int(0.05 * sr)
    step = np.concatenate([heel, np.zeros(toe_delay)])
    step[toe_delay:] += 0.5 * heel
    return _place(n, _pulse_starts(rng, n, sr, rng.uniform(1.6, 2.4), 0.05), step)


def _knock(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    knock_len = int(0.06 * sr)
    m = np.arange(knock_len)
    knock = np.sin(2 * np.pi * rng.uniform(150, 300) * m / sr) * _decay(
        knock_len, sr, rng.uniform(0.012, 0.025)
    )
    knock += (
        0.3
        * _filter(rng.standard_normal(knock_len), "bandpass", (800, 3000), sr)
        * _decay(knock_len, sr, 0.003)
    )
    rate, per_group = rng.uniform(5, 7), int(rng.integers(2, 5))
    starts = []
    for group_start in range(0, n, int(sr * (per_group / rate + rng.uniform(0.4, 0.7)))):
        starts += [group_start + int(k * sr / rate) for k in range(per_group)]
    return _place(n, starts, knock)


def _clock_tick(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    tick_len = int(0.012 * sr)
    centre = rng.uniform(2000, 3500)
    ticks = [
        _filter(rng.standard_normal(tick_len), "bandpass", (c * 0.8, c * 1.2), sr)
        * _decay(tick_len, sr, 0.002)
        for c in (centre, centre * 0.75)  # tick and tock differ in pitch
    ]
    starts = _pulse_starts(rng, n, sr, rng.uniform(1.8, 4.0), 0.0)
    out = np.zeros(n)
    for k, start in enumerate(starts):
        out += _place(n, [start], ticks[k % 2])
    return out


def _bell(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    f = rng.uniform(400, 1100)
    m = np.arange(n)
    ratios = (0.56, 0.92, 1.19, 1.71, 2.0, 2.74, 3.0, 3.76, 4.07)  # inharmonic partials of a bell
    tau = rng.uniform(0.5, 1.4)
    strike = np.zeros(n)
    for k, r in enumerate(ratios):
        if r * f < 0.45 * sr:
            strike += (
                (1.0 / (1 + 0.3 * k))
                * np.sin(2 * np.pi * r * f * m / sr + rng.uniform(0, 2 * np.pi))
                * _decay(n, sr, tau / (1 + 0.4 * k))
            )
    strikes = [0] if n < 1.2 * sr else [0, int(rng.uniform(0.6, 1.0) * sr)]
    return _place(n, strikes, strike)


def _alarm_beep(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    square = np.sign(np.sin(_phase(rng.uniform(1000, 2800), n, sr)))
    gate_rate = rng.uniform(3, 7)
    gate = (np.sin(2 * np.pi * gate_rate * np.arange(n) / sr) > 0).astype(float)
    return _filter(square, "lowpass", 0.4 * sr, sr) * gate


def _buzzer(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    square = np.sign(np.sin(_phase(rng.uniform(80, 220), n, sr)))
    return _filter(square, "lowpass", rng.uniform(2500, 5000), sr)


def _siren(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    centre, depth = rng.uniform(600, 1000), rng.uniform(0.2, 0.35)
    rate = rng.choice([rng.uniform(0.3, 0.7), rng.uniform(2.5, 4.0)])  # wail or yelp
    t = np.arange(n) / sr
    freq = centre * (1 + depth * np.sin(2 * np.pi * rate * t - np.pi / 2))  # starts low and rises
    return _harmonic(freq, n, sr, [1.0, 0.4, 0.2])


def _car_horn(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    f1 = rng.uniform(330, 450)
    weights = [1.0 / h for h in range(1, 12)]
    tone = _harmonic(f1, n, sr, weights) + _harmonic(f1 * 1.26, n, sr, weights)
    honk_len = min(n, int(rng.uniform(0.25, 0.6) * sr))
    gate = _place(n, _pulse_starts(rng, n, sr, rng.uniform(1.2, 2.0), 0.0), np.ones(honk_len))
    return tone * np.minimum(gate, 1.0)


def _engine(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    t = np.arange(n) / sr
    f0 = rng.uniform(25, 60) * (1 + 0.03 * np.sin(2 * np.pi * rng.uniform(0.2, 0.6) * t))
    hum = _harmonic(f0, n, sr, [1.0 / h**0.7 for h in range(1, 16)])
    hum *= 1 + 0.5 * np.sin(2 * np.pi * f0 * 0.5 * t)  # firing-rate amplitude modulation
    return hum + 0.3 * _filter(rng.standard_normal(n), "lowpass", 400, sr)


def _helicopter(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    blade_rate = rng.uniform(12, 22)
    t = np.arange(n) / sr
    chop = np.maximum(0.0, np.sin(2 * np.pi * blade_rate * t)) ** 6  # short thumps per blade pass
    thumps = _filter(rng.standard_normal(n), "lowpass", rng.uniform(300, 700), sr) * chop
    whine = 0.05 * np.sin(_phase(rng.uniform(1200, 2000), n, sr))
    return thumps + whine


def _tone(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    return np.sin(_phase(rng.uniform(300, 2000), n, sr))


def _organ(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    root = rng.uniform(130, 330)
    chord = (1.0, 1.26, 1.5) if rng.random() < 0.5 else (1.0, 1.19, 1.5)  # major or minor triad
    weights = [1.0, 0.7, 0.5, 0.35, 0.0, 0.25, 0.0, 0.15]
    out = sum(_harmonic(root * r, n, sr, weights) for r in chord)
    t = np.arange(n) / sr
    out = out * (1 + 0.1 * np.sin(2 * np.pi * 5.5 * t))
    return out * np.minimum(1.0, t / 0.06)


def _whistle(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    notes = rng.uniform(1000, 2500, int(rng.integers(2, 5)))
    contour = np.interp(np.linspace(0, notes.size - 1, n), np.arange(notes.size), notes)  # gliding melody
    t = np.arange(n) / sr
    freq = contour * (1 + 0.02 * np.sin(2 * np.pi * rng.uniform(4.5, 6.5) * t))
    return np.sin(_phase(freq, n, sr)) + 0.03 * _filter(rng.standard_normal(n), "bandpass", (900, 3000), sr)


def _laser_zap(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    zap_len = int(rng.uniform(0.08, 0.2) * sr)
    u = np.linspace(0, 1, zap_len)
    freq = rng.uniform(2500, 3800) * (rng.uniform(150, 300) / 3000) ** u  # exponential downward sweep
    zap = np.sign(np.sin(_phase(freq, zap_len, sr))) * (1 - u) ** 1.5
    return _place(n, _pulse_starts(rng, n, sr, rng.uniform(2.5, 5.0), 0.1), _filter(zap, "lowpass", 5000, sr))


def _rain(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    drops = np.zeros(n)
    count = int(n / sr * rng.uniform(300, 700)) + 1
    np.add.at(drops, rng.integers(0, n, count), rng.uniform(0.2, 1.0, count) ** 2)
    patter = _filter(drops, "bandpass", (rng.uniform(2000, 3500), 0.44 * sr), sr, order=4)
    bed = 0.15 * _filter(rng.standard_normal(n), "highpass", 1500, sr)
    return patter + bed


def _wind(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    noise = rng.standard_normal(n)
    low, high = _filter(noise, "bandpass", (150, 500), sr), _filter(noise, "bandpass", (500, 1400), sr)
    gusts = _smooth_random(rng, n, sr, rng.uniform(0.5, 1.5))
    pitch = _smooth_random(rng, n, sr, 0.8)  # the howl moves between a low and a high band
    return gusts * (low * (1 - pitch) + 1.5 * high * pitch)


def _steam_hiss(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    return _filter(rng.standard_normal(n), "highpass", min(rng.uniform(4000, 5500), 0.4 * sr), sr, order=4)


def _waterfall(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    roar = _filter(pink_noise(rng, n), "lowpass", rng.uniform(3000, 5000), sr)
    bubbling = 0.8 + 0.4 * _smooth_random(rng, n, sr, 12.0)  # small fast level changes, not a gust
    return roar * bubbling


def _thunder(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    brown = np.cumsum(rng.standard_normal(n))
    brown -= np.linspace(brown[0], brown[-1], n)  # no DC drift
    rumble = _filter(brown, "bandpass", (40, rng.uniform(350, 700)), sr, order=2)
    rumble /= np.max(np.abs(rumble)) + 1e-9
    envelope = np.minimum(1.0, np.arange(n) / (rng.uniform(0.05, 0.3) * sr)) * _decay(
        n, sr, rng.uniform(0.8, 1.8)
    )
    out = rumble * envelope * _smooth_random(rng, n, sr, 4.0)
    if rng.random() < 0.5:  # a close strike starts with a broadband crack
        crack_len = min(n, int(0.25 * sr))
        crack = _filter(rng.standard_normal(crack_len), "lowpass", 3000, sr) * _decay(crack_len, sr, 0.06)
        out[:crack_len] += 0.5 * crack / (np.max(np.abs(crack)) + 1e-9)
    return out


def _fire(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    from scipy import signal
    pops = np.zeros(n)
    count = int(n / sr * rng.uniform(12, 35)) + 1
    np.add.at(pops, rng.integers(0, n, count), rng.pareto(2.0, count) + 0.2)
    kernel_len = int(0.004 * sr)
    crackle = signal.oaconvolve(pops, rng.standard_normal(kernel_len) * _decay(kernel_len, sr, 0.001))[:n]
    crackle /= np.max(np.abs(crackle)) + 1e-9
    roar = 0.08 * _filter(rng.standard_normal(n), "lowpass", 300, sr)
    return crackle + roar


def _water_drip(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    drip_len = int(rng.uniform(0.03, 0.06) * sr)
    u = np.linspace(0, 1, drip_len)
    freq = rng.uniform(700, 1200) * (1 + rng.uniform(0.8, 1.5) * u)  # the "plip" glides upwards
    drip = np.sin(_phase(freq, drip_len, sr)) * _decay(drip_len, sr, 0.015)
    return _place(n, _pulse_starts(rng, n, sr, rng.uniform(1.5, 3.5), 0.25), drip)


# Event type name -> renderer (the names of events.yaml).
RENDERERS: dict[str, Renderer] = {
    "dog_bark": _dog_bark,
    "cat_meow": _cat_meow,
    "bird_song": _bird_song,
    "frog_croak": _frog_croak,
    "speech": _speech,
    "applause": _applause,
    "footsteps": _footsteps,
    "knock": _knock,
    "clock_tick": _clock_tick,
    "bell": _bell,
    "alarm_beep": _alarm_beep,
    "buzzer": _buzzer,
    "siren": _siren,
    "car_horn": _car_horn,
    "engine": _engine,
    "helicopter": _helicopter,
    "tone": _tone,
    "organ": _organ,
    "whistle": _whistle,
    "laser_zap": _laser_zap,
    "rain": _rain,
    "wind": _wind,
    "steam_hiss": _steam_hiss,
    "waterfall": _waterfall,
    "thunder": _thunder,
    "fire": _fire,
    "water_drip": _water_drip,
}


def render_event(event_type: str, rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """One event of ``event_type``, ``n`` samples long, with faded edges and a common level.

    The level is RMS ``EVENT_RMS`` unless that would push the peak over 1: dense sounds (buzzer,
    tone) then match in loudness, and sparse ones (ticks, crackles) are as loud as they can be.
    """
    n = max(int(n), 1)
    audio = np.asarray(RENDERERS[event_type](rng, n, sr), dtype=np.float64)[:n]
    if audio.size < n:
        audio = np.pad(audio, (0, n - audio.size))
    audio = _fade(audio, sr)
    peak = float(np.max(np.abs(audio)))
    if peak == 0:
        return audio
    rms = float(np.sqrt(np.mean(audio**2)))
    return audio * min(EVENT_RMS / rms, 1.0 / peak)
