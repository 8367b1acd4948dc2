"""Extraction speed on the default corpus, this tree against a baseline revision side by side.

    python benchmarks/extract.py --baseline 2bf2b27            # both trees, interleaved, every clip
    python benchmarks/extract.py --every 3 --rounds 1          # every 3rd clip, this tree only
    python benchmarks/extract.py --synthetic --experts logmel aisfx yamnet   # the per-expert speed table

Prints one JSON document and writes it to ``--out`` (benchmarks/results/extract.json).

- ``corpus``: per expert (``--experts``, default features.experts), the real driver
  (``extract_features`` over every split: decoding, fingerprints, shards, merge) on the
  clips of the prepared default corpus (data/<Dataset>/manifest.json; ``--every k`` takes
  every k-th clip), written to a temp root with params.yaml's settings, on the CPU. Each run
  is a child process of one tree; with ``--baseline`` the baseline's ``git worktree`` and
  this tree alternate (which goes first alternates too), ``--rounds`` times. Per side: clips,
  audio seconds, wall seconds of the extraction, of the ``embed`` calls in it and of the
  whole process (start-up, imports, building the expert: what a DVC stage costs), x real
  time (audio seconds / extraction wall seconds), CPU seconds and the 1-min load average
  around the run; the best round, and every round.
- ``equivalence``: for ``--check-clips`` clips, the largest absolute difference between
  the features the two trees wrote, that difference relative to the clip's largest value,
  and how many clips are bitwise equal; and each tree's error against a float64 evaluation
  of the same computation (for aisfx: the package's network in float64), which says whether
  a difference is float32 rounding or a change.
- ``synthetic`` (``--synthetic``, instead of the corpus): the real-time factor of each
  expert's ``embed`` on synthetic clips, as this benchmark reported before (logmel, aisfx and
  yamnet with their real weights; panns and vggish with random weights in a temp
  checkpoint, marked "random_weights": same architecture and cost).
- ``load``: ``uptime`` before and after, cores, torch threads, OMP_WAIT_POLICY. On a shared
  machine compare the two sides of one round (same load), not rounds or runs of other days.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Recorded before atric is imported (it sets a default): children run with the user's setting.
USER_OMP_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY")
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "extract.json"
TARGETS = {"logmel": 300.0, "aisfx": 20.0}  # x real time
RANDOM_WEIGHTS = ("panns_cnn10", "panns_cnn14", "vggish")


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def cpu_seconds(who: int = resource.RUSAGE_SELF) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


# ------------------------------------------------------------------ one run (a child process)
def child(args: argparse.Namespace) -> int:
    """Extract one expert for every split of ``--manifest`` with the tree at ``--src``; print JSON."""
    started = time.perf_counter()
    sys.path.insert(0, args.src)
    import h5py
    import numpy as np
    import torch

    from atric.features.base import build_expert
    from atric.features.extract import extract_features
    from atric.layout import SPLITS, Layout, read_manifest

    manifest = read_manifest(args.manifest)
    layout = Layout(manifest.dataset, args.root)
    expert = build_expert(args.expert, json.loads(args.settings), args.device)
    built = time.perf_counter()
    cpu_before = cpu_seconds()
    reports = []
    for split in SPLITS:
        if manifest.split(split):
            reports.append(
                extract_features(
                    manifest,
                    layout,
                    expert,
                    split,
                    batch_size=args.batch_size,
                    on_error="raise",
                    progress=False,
                )
            )
    extract_wall = time.perf_counter() - built
    wanted = set(json.loads(args.check))
    dump = {}
    for report in reports:
        with h5py.File(report.path, "r") as h5:
            dump.update({k: h5[k][()] for k in h5 if k in wanted})
    np.savez(args.dump, **dump)
    print(
        json.dumps(
            {
                "clips": sum(r.clips for r in reports),
                "computed": sum(r.computed for r in reports),
                "audio_seconds": sum(r.audio_seconds for r in reports),
                "extract_wall_seconds": extract_wall,
                "embed_seconds": sum(r.compute_seconds for r in reports),
                "extract_cpu_seconds": cpu_seconds() - cpu_before,
                "startup_seconds": built - started,  # imports and building the expert
                "torch_threads": torch.get_num_threads(),
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            }
        )
    )
    return 0


def run_child(src: Path, expert: str, settings: dict, work: Path, args: argparse.Namespace, check: list[str]):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if USER_OMP_WAIT_POLICY is not None:
        env["OMP_WAIT_POLICY"] = USER_OMP_WAIT_POLICY
    env["PYTHONPATH"] = str(src)
    root = Path(tempfile.mkdtemp(dir=work))
    dump = root / "check.npz"
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        f"--src={src}",
        f"--expert={expert}",
        f"--settings={json.dumps(settings)}",
        f"--manifest={work / 'manifest.json'}",
        f"--root={root}",
        f"--dump={dump}",
        f"--check={json.dumps(check)}",
        f"--batch-size={args.batch_size}",
        f"--device={args.device}",
    ]
    load_before = os.getloadavg()[0]
    cpu_before = cpu_seconds(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=src.parent, check=False)
    process_wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{src}: {expert} run failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result |= {
        "process_wall_seconds": process_wall,
        "process_cpu_seconds": cpu_seconds(resource.RUSAGE_CHILDREN) - cpu_before,
        "load_1min_before": round(load_before, 2),
        "load_1min_after": round(os.getloadavg()[0], 2),
    }
    result["x_real_time"] = result["audio_seconds"] / result["extract_wall_seconds"]
    result["embed_x_real_time"] = result["audio_seconds"] / max(result["embed_seconds"], 1e-9)
    return result, dump


def _rounded(run: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in run.items()}


def _best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    best = min(runs, key=lambda r: r["extract_wall_seconds"])
    out = _rounded(best)
    out["x_real_time"] = round(best["x_real_time"], 1)
    out["embed_x_real_time"] = round(best["embed_x_real_time"], 1)
    out["median_extract_wall_seconds"] = round(statistics.median(r["extract_wall_seconds"] for r in runs), 2)
    return out


# ------------------------------------------------------------------ equivalence
def float64_reference(expert_name: str, settings: dict, waveform, sample_rate: int):
    """The expert's computation in float64 from the same decoded waveform (current tree's loader)."""
    import librosa
    import numpy as np
    import torch

    if expert_name == "logmel":
        from atric.features.base import build_expert, pad_to_min_length

        expert = build_expert("logmel", settings)
        y = pad_to_min_length(waveform, expert.n_fft).astype(np.float64)
        power = np.abs(librosa.stft(y, n_fft=expert.n_fft, hop_length=expert.hop_length, center=True)) ** 2
        basis = librosa.filters.mel(
            sr=expert.sample_rate,
            n_fft=expert.n_fft,
            n_mels=expert.config.n_mels,
            fmin=expert.config.fmin,
            fmax=expert.config.fmax,
        ).astype(np.float32)
        mel = basis.astype(np.float64) @ power
        return librosa.power_to_db(mel, ref=1.0, amin=1e-10, top_db=None).T
    if expert_name == "aisfx":
        import copy

        from atric.features import aisfx as A
        from atric.features.base import build_expert, pad_to_min_length

        expert = build_expert("aisfx", settings)
        net = copy.deepcopy(expert.model).double()
        y = waveform.astype(np.float32)
        y = y / (np.max(np.abs(y)) or 1.0)
        y = pad_to_min_length(y, A.N_FFT).astype(np.float64)
        power = np.abs(librosa.stft(y, n_fft=A.N_FFT, hop_length=A.HOP, center=True)) ** 2
        basis = librosa.filters.mel(
            sr=A.SAMPLE_RATE,
            n_fft=A.N_FFT,
            n_mels=A.MEL_BINS,
            fmin=0.0,
            fmax=A.SAMPLE_RATE / 2,
            htk=True,
            norm=1.0,
        ).astype(np.float32)
        spec = (np.log10((basis.astype(np.float64) @ power) * 10000.0 + 1.0) / A.SPEC_MAX).T
        step = expert.step
        n = 1 + int(np.ceil(max(0, spec.shape[0] - A.BLOCK_FRAMES) / step))
        padded = np.zeros(((n - 1) * step + A.BLOCK_FRAMES, A.MEL_BINS))
        padded[: spec.shape[0]] = spec
        x = torch.from_numpy(padded)[None, None]
        with torch.inference_mode():
            for block, pool in (
                (net.conv_block1, (2, 2)),
                (net.conv_block2, (2, 2)),
                (net.conv_block3, (2, 2)),
                (net.conv_block4, (1, 1)),
            ):
                x = block(x, pool_size=pool, pool_type=net.pool_type)
            fmap = x.mean(dim=3)
            return (
                fmap.unfold(2, A.BLOCK_POSITIONS, step // A.TIME_STRIDE)
                .amax(dim=3)
                .transpose(1, 2)[0, :n]
                .numpy()
            )
    return None


def _difference(a: dict, b: dict) -> dict[str, Any]:
    import numpy as np

    keys = sorted(set(a) & set(b))
    shapes = all(a[k].shape == b[k].shape for k in keys)
    if not keys or not shapes:
        return {"clips": len(keys), "same_shapes": shapes}
    return {
        "clips": len(keys),
        "same_shapes": True,
        "max_abs_difference": float(max(np.abs(a[k].astype(np.float64) - b[k]).max() for k in keys)),
        "max_difference_relative_to_clip_scale": float(
            max(np.abs(a[k].astype(np.float64) - b[k]).max() / max(np.abs(b[k]).max(), 1e-30) for k in keys)
        ),
        "bitwise_equal_clips": sum(bool(np.array_equal(a[k], b[k])) for k in keys),
    }


def equivalence(
    expert: str, settings: dict, manifest, check: list[str], dumps: dict[str, Path]
) -> dict[str, Any]:
    import numpy as np

    from atric.audio import load_audio
    from atric.features.base import build_expert

    features = {side: dict(np.load(path)) for side, path in dumps.items()}
    out: dict[str, Any] = {}
    if "baseline" in features:
        out["current_vs_baseline"] = _difference(features["current"], features["baseline"])
    sample_rate = build_expert(expert, settings).sample_rate
    clips = {c.clip_id: c for c in manifest.clips}
    exact = {}
    for clip_id in check:
        waveform = load_audio(manifest.audio_path(clips[clip_id]), sample_rate, clip_id)
        reference = float64_reference(expert, settings, waveform, sample_rate)
        if reference is not None:
            exact[clip_id] = reference
    if exact:
        for side, values in features.items():
            out[f"{side}_vs_float64"] = _difference(values, exact)
    return out


# ------------------------------------------------------------------ sections
def corpus(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import yaml

    from atric.layout import read_manifest, write_manifest

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    dataset, data_root = params["data"]["dataset"], params["data"]["root"]
    full = read_manifest(ROOT / data_root / dataset / "manifest.json")
    clips = tuple(full.clips[:: args.every])
    audio_root = str((ROOT / full.audio_root).resolve())
    manifest = type(full)(full.dataset, full.source, full.sample_rate, audio_root, clips)
    write_manifest(work / "manifest.json", manifest)
    step = max(1, len(clips) // args.check_clips)
    check = [c.clip_id for c in clips[::step]][: args.check_clips]
    trees = {"current": ROOT / "src"}
    if args.baseline:
        baseline_tree = work / "baseline"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(baseline_tree), args.baseline],
            check=True,
            capture_output=True,
        )
        trees = {"baseline": baseline_tree / "src", **trees}
    out: dict[str, Any] = {}
    try:
        for expert in args.experts or params["features"]["experts"]:
            settings = params["features"].get(expert) or {}
            runs: dict[str, list[dict[str, Any]]] = {side: [] for side in trees}
            dumps: dict[str, Path] = {}
            for round_ in range(args.rounds):
                order = list(trees) if round_ % 2 == 0 else list(reversed(trees))
                for side in order:
                    result, dump = run_child(trees[side], expert, settings, work, args, check)
                    runs[side].append(result)
                    dumps[side] = dump
                    print(
                        f"{expert} round {round_ + 1} {side}: {result['extract_wall_seconds']:.1f} s, "
                        f"{result['x_real_time']:.1f}x real time (load {result['load_1min_before']})",
                        file=sys.stderr,
                        flush=True,
                    )
            row: dict[str, Any] = {"settings": settings, **{side: _best(r) for side, r in runs.items()}}
            row["rounds"] = {side: [_rounded(r) for r in rs] for side, rs in runs.items()}
            if "baseline" in runs:
                ratios = [
                    b["extract_wall_seconds"] / c["extract_wall_seconds"]
                    for b, c in zip(runs["baseline"], runs["current"], strict=True)
                ]
                row["speedup_extract_wall_per_round"] = [round(r, 2) for r in ratios]
                row["speedup_extract_wall_best"] = round(
                    row["baseline"]["extract_wall_seconds"] / row["current"]["extract_wall_seconds"], 2
                )
                row["speedup_process_wall_best"] = round(
                    min(r["process_wall_seconds"] for r in runs["baseline"])
                    / min(r["process_wall_seconds"] for r in runs["current"]),
                    2,
                )
            if expert in TARGETS:
                row["target_x_real_time"] = TARGETS[expert]
                row["meets_target"] = row["current"]["x_real_time"] >= TARGETS[expert]
            row["equivalence"] = equivalence(expert, settings, manifest, check, dumps)
            out[expert] = row
    finally:
        if args.baseline:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(work / "baseline")],
                capture_output=True,
                check=False,
            )
    return {"baseline": args.baseline, "clips_every": args.every, "experts": out}


def synthetic_clips(n: int, seconds: float, sample_rate: int):
    """Tones, noise bursts and pulses, so spectra are not degenerate."""
    import numpy as np

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
    import torch

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


def synthetic(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Seconds of audio per second of ``embed`` for each expert, on synthetic clips (one tree)."""
    from atric.features.base import build_expert

    out = {}
    for name in args.experts or ["logmel", "aisfx", "yamnet", "panns_cnn10", "panns_cnn14", "vggish"]:
        settings = {"checkpoint": str(random_checkpoint(name, work))} if name in RANDOM_WEIGHTS else {}
        expert = build_expert(name, settings, args.device)
        clips = synthetic_clips(args.synthetic_clips, args.seconds, expert.sample_rate)
        expert.embed(clips[:1])  # warm-up: librosa/numba and torch start-up is not per-clip cost
        frames = 0
        cpu_before = cpu_seconds()
        start = time.perf_counter()
        for i in range(0, len(clips), args.batch_size):
            frames += sum(o.shape[0] for o in expert.embed(clips[i : i + args.batch_size]))
        elapsed = time.perf_counter() - start
        cpu = cpu_seconds() - cpu_before
        audio = len(clips) * args.seconds
        out[name] = {
            "real_time_factor": round(audio / elapsed, 1),
            "clips": len(clips),
            "clip_seconds": args.seconds,
            "compute_seconds": round(elapsed, 2),
            "cpu_seconds": round(cpu, 2),
            "dim": expert.dim,
            "frames_per_clip": round(frames / len(clips), 1),
            "hop_seconds": round(expert.hop_seconds, 4),
            "random_weights": name in RANDOM_WEIGHTS,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }
        if name in TARGETS:
            out[name] |= {"target": TARGETS[name], "meets_target": audio / elapsed >= TARGETS[name]}
        print(f"{name}: {out[name]['real_time_factor']}x", file=sys.stderr, flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--experts", nargs="+", help="default: features.experts (corpus), every expert (synthetic)"
    )
    parser.add_argument("--baseline", help="a git revision to run side by side (a temporary worktree)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--every", type=int, default=1, help="every k-th clip of the corpus")
    parser.add_argument("--check-clips", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=None, help="default: features.batch_size")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--synthetic", action="store_true", help="the per-expert table on synthetic clips")
    parser.add_argument("--synthetic-clips", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=7.0, help="synthetic clip length")
    parser.add_argument("--out", type=Path, default=RESULTS)
    # a child run
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for name in ("--src", "--expert", "--settings", "--manifest", "--root", "--dump", "--check"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.batch_size = int(args.batch_size)
        return child(args)
    if args.batch_size is None:
        import yaml

        args.batch_size = int(yaml.safe_load((ROOT / "params.yaml").read_text())["features"]["batch_size"])
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    report: dict[str, Any] = {
        "load": {
            "uptime_before": uptime(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "omp_wait_policy_of_the_user": USER_OMP_WAIT_POLICY,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "device": args.device,
        }
    }
    with tempfile.TemporaryDirectory(prefix="atric-extract-bench-") as tmp:
        if args.synthetic:
            report["synthetic"] = synthetic(args, Path(tmp))
        else:
            report["corpus"] = corpus(args, Path(tmp))
    report["load"]["uptime_after"] = uptime()
    text = json.dumps(report, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
