"""Real-time factor (seconds of audio per second of compute) of every audio expert on this machine.

    python benchmarks/extract.py [--clips 40] [--seconds 7] [--experts logmel aisfx ...]

Prints JSON. logmel, aisfx and yamnet use their real settings (aisfx and yamnet: the
pretrained weights their packages ship); panns_cnn10, panns_cnn14 and vggish have no
public weights here, so they run with random weights saved to a temp checkpoint (marked
"random_weights": true): same architecture and cost. "real_time_factor" is wall clock; on a shared machine
"real_time_factor_if_cores_were_free" (from CPU time) says what the cores themselves can do.
Each expert is warmed up on one clip first (librosa/numba and
torch start-up is not per-clip cost). Peak RSS is the process's maximum so far
(resource.getrusage), so it only grows along the list.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from atric.device import resolve_device
from atric.features.base import build_expert

TARGETS = {"logmel": 300.0, "aisfx": 20.0}
RANDOM_WEIGHTS = ("panns_cnn10", "panns_cnn14", "vggish")


def synthetic_clips(n: int, seconds: float, sample_rate: int) -> list[np.ndarray]:
    """Tones, noise bursts and pulses, so spectra are not degenerate."""
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    clips = []
    for i in range(n):
        tone = np.sin(2 * np.pi * rng.uniform(100, 2000) * t) * (t < seconds / 2)
        noise = rng.standard_normal(t.size) * 0.3 * (t > seconds / 3)
        pulses = (np.sin(2 * np.pi * rng.uniform(1, 5) * t) > 0.9) * np.sin(2 * np.pi * 700 * t)
        clips.append((0.2 * (tone + noise + pulses) / (1 + i % 3)).astype(np.float32))
    return clips


def random_checkpoint(name: str, directory: Path) -> Path:
    from atric.features.panns import PannsCnn
    from atric.features.vggish import VGGishNet

    torch.manual_seed(0)
    model = {
        "panns_cnn10": lambda: PannsCnn((64, 128, 256, 512)),
        "panns_cnn14": lambda: PannsCnn((64, 128, 256, 512, 1024, 2048)),
        "vggish": VGGishNet,
    }[name]()
    path = directory / f"{name}.pth"
    torch.save(model.state_dict(), path)
    return path


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return round(kb / 1024, 1)


def bench(name: str, clips_n: int, seconds: float, batch: int, device: torch.device, tmp: Path) -> dict:
    settings = {"checkpoint": str(random_checkpoint(name, tmp))} if name in RANDOM_WEIGHTS else {}
    expert = build_expert(name, settings, device)
    clips = synthetic_clips(clips_n, seconds, expert.sample_rate)
    expert.embed(clips[:1])  # warm-up
    frames = 0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_before = usage.ru_utime + usage.ru_stime
    start = time.perf_counter()
    for i in range(0, len(clips), batch):
        frames += sum(o.shape[0] for o in expert.embed(clips[i : i + batch]))
    elapsed = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_seconds = usage.ru_utime + usage.ru_stime - cpu_before
    audio = clips_n * seconds
    rtf = audio / elapsed
    result = {
        "real_time_factor": round(rtf, 1),
        "clips": clips_n,
        "clip_seconds": seconds,
        "compute_seconds": round(elapsed, 2),
        "cpu_seconds": round(cpu_seconds, 2),
        # What the wall-clock factor would be with every core to ourselves: audio seconds per
        # CPU-second times the core count (other processes sharing the cores slow the wall clock).
        "real_time_factor_if_cores_were_free": round(audio / cpu_seconds * (os.cpu_count() or 1), 1),
        "dim": expert.dim,
        "frames_per_clip": round(frames / clips_n, 1),
        "hop_seconds": round(expert.hop_seconds, 4),
        "random_weights": name in RANDOM_WEIGHTS,
        "peak_rss_mb": peak_rss_mb(),
    }
    if name in TARGETS:
        result["target"] = TARGETS[name]
        result["meets_target"] = rtf >= TARGETS[name]
    if name in ("aisfx", "yamnet"):
        result["settings"] = expert.settings()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=7.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--experts", nargs="+", default=["logmel", "aisfx", "yamnet", "panns_cnn10", "panns_cnn14", "vggish"]
    )
    args = parser.parse_args()
    device = resolve_device(args.device)
    report: dict = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_1min_at_start": round(os.getloadavg()[0], 2),
            "device": str(device),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "experts": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.experts:
            report["experts"][name] = bench(
                name, args.clips, args.seconds, args.batch_size, device, Path(tmp)
            )
            print(f"{name}: {report['experts'][name]['real_time_factor']}x", file=sys.stderr, flush=True)
    report["machine"]["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
