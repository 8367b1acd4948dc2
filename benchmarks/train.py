"""Training speed: this tree against a baseline revision side by side, idle and under load;
AudioCaps-scale streaming from a cold page cache; metrics time.

    python benchmarks/train.py --baseline cc6cc6f --clip-sampling --clip-baseline 232b2ad
                                                             # side by side, idle and loaded
    python benchmarks/train.py --stream-clips 50000          # + the real AudioCaps size streamed

Prints one JSON document and writes it to ``--out``, with its tables beside it as ``.md`` and a
plot as ``.png`` (``--render`` writes those two again from an existing JSON):

- ``side_by_side``: per dataset (the default corpus's train/val splits; AudioCaps-shaped
  features, ``--clips`` x 31 x 2048 float32 with one caption per train clip as in AudioCaps)
  and per pooling, the engine's real ``train()`` (training steps, validation on val and both
  checkpoints every epoch) run by the current tree and by a ``git worktree`` of ``--baseline``
  in subprocesses, interleaved, on identical data and params (``train.sampling`` pairs, the
  default; ``--clip-sampling`` adds the paper's clip batching). Reported per side: training
  captions/s (captions of the train steps / step seconds), step seconds per epoch and whole
  epoch seconds (with validation and checkpoints), the process's CPU seconds per whole epoch
  (every thread, busy-waiting ones too) and training captions per CPU second (what a shared
  machine running several trials gets out of its cores), and the current/baseline ratios. The first
  epoch is left out of the means (one-off warm-up). ``--repeats N`` runs each side N times,
  alternating, and reports its median run (with every run's captions/s): on shared cores one run
  can be 1.5x slower than the next.
- ``under_load``: the same runs for ``--load-poolings`` beside a competing 2-core load that
  the benchmark starts itself (two busy processes), as loaded/idle ratios per side.
- ``two_at_once``: for ``--together-poolings``, two runs of a side started together (two tune
  workers or two pipeline stages on one machine; each side with its own default threads), their
  summed training captions/s and its current/baseline ratio: what the whole machine trains.
- ``streaming``: ``--stream-clips`` AudioCaps-shaped clips written to HDF5, evicted from the
  page cache (posix_fadvise DONTNEED), then streamed through the engine's own ``train_epoch``
  for each ``--num-workers`` value (0, the default: a background thread builds the batches;
  2: DataLoader worker processes): clips/s, data-wait share (target < 0.10) and peak memory of
  the process and its workers, summed RSS and PSS (target < 4 GiB); and what the loader alone
  delivers (no training step), idle and beside one busy process. ``--stream-dir`` keeps the
  clips (12.7 GB at AudioCaps size) for the next run.
- ``metrics``: milliseconds for the metrics of a 5,000 x 1,000 similarity matrix, both
  directions (median of 7; target < 20 ms).
- ``load``: ``uptime`` before and after, cores, torch threads, OMP_WAIT_POLICY.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

# Recorded before atric is imported (it sets a default): the baseline's children must run
# with what the user's environment says, not with this tree's default.
USER_OMP_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY")
ROOT = Path(__file__).resolve().parents[1]
GIB = 1 << 30
RESULTS = ROOT / "benchmarks" / "results" / "train.json"
BASE_POOLINGS = ("mean", "max", "lstm", "netvlad", "netrvlad")


# ------------------------------------------------------------------ one run (a child process)
def child(args: argparse.Namespace) -> int:
    """Run ``train()`` of the tree at ``--src`` once and print its timings as JSON."""
    sys.path.insert(0, args.src)
    from atric.config import load_params  # the tree under test's own code, imported before torch
    from atric.data import open_split
    from atric.engine import train
    from atric.layout import Layout

    # isort: split
    import torch

    params = load_params(args.params, json.loads(args.overrides))
    tp = params.train
    layout = Layout(params.data.dataset, params.data.root)
    data = open_split(
        layout, "train", experts=tp.experts, vectors=params.text.vectors, max_frames=tp.max_frames
    )
    captions, clips = len(data.words), len(data)
    data.close()
    sampling = getattr(tp, "sampling", "pairs")  # older revisions only had pairs
    items = clips if sampling == "clip" else captions
    batch = min(tp.batch_size, items)
    train_captions = (items // batch) * batch if sampling == "pairs" else None
    start, cpu_start = time.perf_counter(), time.process_time()
    epoch_ends: list[float] = []
    epoch_cpu_ends: list[float] = []

    class Clock:
        def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
            epoch_ends.append(time.perf_counter())
            epoch_cpu_ends.append(time.process_time())  # every thread of the process, spinning ones too

    result = train(params, restart=True, callbacks=[Clock()])
    whole = [b - a for a, b in zip([start, *epoch_ends[:-1]], epoch_ends)]
    cpu = [b - a for a, b in zip([cpu_start, *epoch_cpu_ends[:-1]], epoch_cpu_ends)]
    steps = result.epoch_seconds
    if train_captions is None:  # clip sampling: every caption of each drawn clip
        per_clip = captions / clips
        train_captions = round((clips // batch) * batch * per_clip)
    print(
        json.dumps(
            {
                "torch_threads": torch.get_num_threads(),
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                "epochs": len(steps),
                "train_captions_per_epoch": train_captions,
                "step_seconds": steps,
                "epoch_seconds": whole,
                "epoch_cpu_seconds": cpu,
                "data_wait_fraction": result.data_wait_fraction,
            }
        )
    )
    return 0


def _summary(run: dict[str, Any]) -> dict[str, Any]:
    steady = slice(1, None) if run["epochs"] > 1 else slice(None)
    step = statistics.mean(run["step_seconds"][steady])
    whole = statistics.mean(run["epoch_seconds"][steady])
    cpu = statistics.mean(run["epoch_cpu_seconds"][steady])
    return {
        "captions_per_s": round(run["train_captions_per_epoch"] / step, 1),
        "step_seconds_per_epoch": round(step, 3),
        "epoch_seconds": round(whole, 3),
        "epoch_cpu_seconds": round(cpu, 3),
        "captions_per_cpu_second": round(run["train_captions_per_epoch"] / cpu, 1),
        "data_wait_fraction": round(statistics.mean(run["data_wait_fraction"][steady]), 4),
        "torch_threads": run["torch_threads"],
        "omp_wait_policy": run["omp_wait_policy"],
    }


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median captions/s (the lower middle of an even count), with every run's."""
    ordered = sorted(runs, key=lambda run: run["captions_per_s"])
    each = [run["captions_per_s"] for run in runs]
    return {**ordered[(len(ordered) - 1) // 2], "captions_per_s_of_each_run": each}


def run_child(src: Path, params_file: Path, overrides: list[str], *, baseline: bool) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if USER_OMP_WAIT_POLICY is not None:
        env["OMP_WAIT_POLICY"] = USER_OMP_WAIT_POLICY
    env["PYTHONPATH"] = str(src)
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        "--src",
        str(src),
        "--params",
        str(params_file),
        "--overrides",
        json.dumps(overrides),
    ]
    done = subprocess.run(
        command, env=env, capture_output=True, text=True, cwd=src.parent, timeout=3600, check=False
    )
    if done.returncode != 0:
        side = "baseline" if baseline else "current"
        raise SystemExit(f"{side} run failed ({' '.join(overrides)}):\n{done.stderr[-3000:]}")
    return _summary(json.loads(done.stdout.strip().splitlines()[-1]))


def run_two_at_once(src: Path, params_file: Path, overrides: list[str], *, baseline: bool) -> dict[str, Any]:
    """Two runs of one side started together (two tune workers, or two pipeline stages, on one
    machine), each writing its own checkpoints: their summed training captions/s."""
    from concurrent.futures import ThreadPoolExecutor

    def one(copy: int) -> dict[str, Any]:
        own_dirs = ("train.models_dir=", "train.metrics_dir=")
        own = [f"{o}-{copy}" if o.startswith(own_dirs) else o for o in overrides]
        return run_child(src, params_file, own, baseline=baseline)

    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(one, (1, 2)))
    return {
        "captions_per_s_together": round(sum(run["captions_per_s"] for run in runs), 1),
        "captions_per_s_of_each": [run["captions_per_s"] for run in runs],
        "epoch_seconds_of_each": [run["epoch_seconds"] for run in runs],
    }


# ------------------------------------------------------------------ a competing load
class CompetingLoad:
    """``processes`` busy processes (another job on the same cores) while the block runs."""

    def __init__(self, processes: int = 2) -> None:
        self.processes = processes
        self._procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Self:
        # Each spins until this process is gone (an interrupted benchmark leaves no load behind).
        spin = "import os\nparent = os.getppid()\nwhile os.getppid() == parent: pass"
        self._procs = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(self.processes)]
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self._procs:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------ data
def write_audiocaps_shaped(
    root: Path, clips: int, val_clips: int, frames: int, dim: int, text_dim: int
) -> str:
    """AudioCaps-shaped train (one caption per clip) and val (five) splits under ``root``."""
    import numpy as np

    from atric.layout import Clip, Layout, write_features, write_index, write_text_embeddings

    layout = Layout("BenchCaps", root)
    rng = np.random.default_rng(0)
    for split, n, per_clip in (("train", clips, 1), ("val", val_clips, 5)):
        ids = [f"{split}{i:06d}" for i in range(n)]
        write_index(
            layout.index_path(split),
            [Clip(c, tuple(f"caption {k} of {c}" for k in range(per_clip))) for c in ids],
            split,
        )

        def features(ids: list[str] = ids):  # generated clip by clip: memory stays small at any size
            for clip_id in ids:
                yield clip_id, rng.standard_normal((frames, dim), dtype=np.float32)

        write_features(layout.features_path("bench", split), features(), {"expert": "bench", "dim": dim})
        words = {
            c: [
                rng.standard_normal((int(rng.integers(6, 21)), text_dim), dtype=np.float32)
                for _ in range(per_clip)
            ]
            for c in ids
        }
        write_text_embeddings(layout.text_path("benchvec", split), words, {"vectors": "benchvec"})
    return "BenchCaps"


def drop_from_page_cache(path: Path) -> None:
    """Evict a file's pages so the next read comes from the disk (no root needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


# ------------------------------------------------------------------ sections
def default_corpus_max_frames() -> dict[str, int]:
    """This tree's padded length per expert of params.yaml's train.experts on the default corpus."""
    from atric.config import load_params
    from atric.data import open_split
    from atric.layout import Layout

    params = load_params(ROOT / "params.yaml")
    tp = params.train
    data = open_split(
        Layout(params.data.dataset, ROOT / params.data.root),
        "train",
        experts=tp.experts,
        vectors=params.text.vectors,
        max_frames=tp.max_frames,
    )
    try:
        return data.max_frames
    finally:
        data.close()


def side_by_side(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Baseline and current on identical data and params, interleaved per pooling."""
    revisions = {"baseline": args.baseline}
    if args.clip_sampling:
        # Revisions from before clip sampling have no train.sampling: those rows take another baseline.
        revisions["clip baseline"] = args.clip_baseline or args.baseline
    worktrees = {name: work / name.replace(" ", "-") for name in revisions}
    for name, revision in revisions.items():
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(worktrees[name]), revision],
            check=True,
            capture_output=True,
        )
    try:
        trees = {"baseline": worktrees["baseline"] / "src", "current": ROOT / "src"}
        # Each side reads its own params.yaml; the benchmark pins what it compares.
        datasets: dict[str, list[str]] = {
            # The padded length pinned: revisions chose it differently (a percentile, the whole clip).
            "default_corpus": [f"data.root={ROOT / 'data'}", f"train.max_frames={json.dumps(default_corpus_max_frames())}"],
        }
        if args.clips:
            bench_root = work / "bench-data"
            write_audiocaps_shaped(bench_root, args.clips, args.val_clips, 31, 2048, 300)
            datasets["audiocaps_shaped"] = [
                f"data.root={bench_root}",
                "data.dataset=BenchCaps",
                'train.experts=["bench"]',
                "text.vectors=benchvec",
                'train.max_frames={"bench": 31}',
            ]

        def on_both_sides(run: Callable[..., dict[str, Any]], overrides: list[str]) -> dict[str, Any]:
            """``run`` on the baseline's tree, then on the current one (pairs batching's baseline)."""
            return {
                side: run(
                    trees[side], trees[side].parent / "params.yaml", overrides, baseline=side == "baseline"
                )
                for side in ("baseline", "current")
            }

        out: dict[str, Any] = {}
        loaded: dict[str, Any] = {}
        together: dict[str, Any] = {}
        for name, data_overrides in datasets.items():
            out[name] = {}
            samplings = ["pairs", "clip"] if args.clip_sampling and name == "default_corpus" else ["pairs"]
            for sampling in samplings:
                for pooling in args.poolings:
                    key = pooling if sampling == "pairs" else f"{pooling} (clip sampling)"
                    overrides = [
                        *data_overrides,
                        f"train.pooling={pooling}",
                        # pairs is every revision's default (older ones have no train.sampling key)
                        *([f"train.sampling={sampling}"] if sampling != "pairs" else []),
                        f"train.epochs={args.epochs}",
                        f"train.models_dir={work / 'models'}",
                        f"train.metrics_dir={work / 'metrics'}",
                        "train.device=cpu",
                        "train.num_workers=0",
                    ]
                    row: dict[str, Any] = {}
                    sides = dict(trees)
                    if sampling == "clip":
                        sides["baseline"] = worktrees["clip baseline"] / "src"
                        row["baseline_revision"] = revisions["clip baseline"]
                    runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "current": []}
                    for _ in range(args.repeats):  # alternating, so both sides meet the same noise
                        for side in ("baseline", "current"):
                            runs[side].append(
                                run_child(
                                    sides[side],
                                    sides[side].parent / "params.yaml",
                                    overrides,
                                    baseline=side == "baseline",
                                )
                            )
                    for side, side_runs in runs.items():
                        row[side] = _median_run(side_runs)
                    row["speedup_captions_per_s"] = round(
                        row["current"]["captions_per_s"] / row["baseline"]["captions_per_s"], 2
                    )
                    row["speedup_epoch_seconds"] = round(
                        row["baseline"]["epoch_seconds"] / row["current"]["epoch_seconds"], 2
                    )
                    per_cpu_s = [row[side]["captions_per_cpu_second"] for side in ("current", "baseline")]
                    row["speedup_captions_per_cpu_second"] = round(per_cpu_s[0] / per_cpu_s[1], 2)
                    out[name][key] = row
                    print(
                        f"{name} {key}: x{row['speedup_captions_per_s']} captions/s, "
                        f"x{row['speedup_epoch_seconds']} epoch, "
                        f"x{row['speedup_captions_per_cpu_second']} per CPU second",
                        file=sys.stderr,
                        flush=True,
                    )
                    # The together and loaded runs are short: at most 3 epochs.
                    short_overrides = [o for o in overrides if not o.startswith("train.epochs=")]
                    short_overrides.append(f"train.epochs={min(args.epochs, 3)}")
                    if name == "default_corpus" and sampling == "pairs" and pooling in args.together_poolings:
                        pair = on_both_sides(run_two_at_once, short_overrides)
                        totals = [pair[side]["captions_per_s_together"] for side in ("current", "baseline")]
                        ratio = round(totals[0] / totals[1], 2)
                        together[pooling] = {**pair, "speedup_captions_per_s_together": ratio}
                        line = f"two at once {pooling}: {json.dumps(together[pooling])}"
                        print(line, file=sys.stderr, flush=True)
                    if name == "default_corpus" and sampling == "pairs" and pooling in args.load_poolings:
                        with CompetingLoad(2):
                            time.sleep(1.0)
                            busy = on_both_sides(run_child, short_overrides)
                        loaded[pooling] = {
                            side: {
                                "idle_epoch_seconds": row[side]["epoch_seconds"],
                                "loaded_epoch_seconds": busy[side]["epoch_seconds"],
                                "loaded_over_idle": round(
                                    busy[side]["epoch_seconds"] / row[side]["epoch_seconds"], 2
                                ),
                                "loaded_captions_per_s": busy[side]["captions_per_s"],
                            }
                            for side in ("baseline", "current")
                        }
                        print(
                            f"under load {pooling}: {json.dumps(loaded[pooling])}",
                            file=sys.stderr,
                            flush=True,
                        )
        return {**revisions, "runs": out, "under_load": loaded, "two_at_once": together}
    finally:
        for tree in worktrees.values():
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                capture_output=True,
                check=False,
            )


def streaming(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The engine's own epoch function over a cold, disk-streamed AudioCaps-sized split."""
    import functools

    import psutil
    import torch

    from atric.config import load_params
    from atric.data import open_split
    from atric.device import configure_threads, resolve_device
    from atric.engine import train_epoch, train_loader
    from atric.factory import build_loss, build_model, build_optimizer
    from atric.layout import Layout
    from atric.precision import Precision

    root = Path(args.stream_dir) if args.stream_dir else work / "stream-data"
    layout = Layout("BenchCaps", root)
    feature_file = layout.features_path("bench", "train")
    t0 = time.perf_counter()
    expected_bytes = args.stream_clips * 31 * 2048 * 4
    if not (feature_file.exists() and expected_bytes <= feature_file.stat().st_size < 1.1 * expected_bytes):
        write_audiocaps_shaped(root, args.stream_clips, 8, 31, 2048, 300)  # else: written by an earlier run
    write_s = time.perf_counter() - t0
    params = load_params(ROOT / "params.yaml")
    device = resolve_device(args.device)
    threads = configure_threads(params.train.threads)  # as train() does
    out: dict[str, Any] = {
        "torch_threads": threads,
        "clips": args.stream_clips,
        "frames": 31,
        "dim": 2048,
        "file_gib": round(feature_file.stat().st_size / GIB, 2),
        "write_s": round(write_s, 1),
        "steps": args.stream_steps,
        "by_num_workers": {},
    }

    def cold_split() -> Any:
        """The streamed train split, its file evicted from the page cache first."""
        drop_from_page_cache(feature_file)
        return open_split(
            layout, "train", experts=["bench"], vectors="benchvec", max_frames={"bench": 31},
            cache_in_ram="no",
        )

    # num_workers 0 is the default: one background thread of the training process builds the
    # batches (atric.data.BackgroundLoader); N > 0 are DataLoader worker processes.
    for workers in args.num_workers:
        side: dict[str, Any] = {"loader_only_clips_per_s": {}, "poolings": {}}
        out["by_num_workers"][str(workers)] = side
        # The loader alone (no training step): what it delivers from a cold cache on idle cores
        # and beside one busy process (the core a training thread takes).
        for competing in (0, 1):
            data = cold_split()
            loader, sampler = train_loader(
                data, batch_size=params.train.batch_size, seed=0, num_workers=workers, device=device
            )
            sampler.set_epoch(3 + competing)
            with CompetingLoad(competing):
                batches = iter(loader)
                for _ in range(args.stream_warmup):
                    next(batches)
                start, clips = time.perf_counter(), 0
                for _ in range(args.stream_steps):
                    clips += int(next(batches).clip_index.shape[0])
                seconds = time.perf_counter() - start
            del batches, loader
            data.close()
            key = "idle" if competing == 0 else "beside_1_busy_process"
            side["loader_only_clips_per_s"][key] = round(clips / seconds, 1)
        alone = side["loader_only_clips_per_s"]
        print(f"streaming, {workers} workers, the loader alone: {alone} clips/s", file=sys.stderr, flush=True)
        for pooling in args.stream_poolings:
            data = cold_split()
            tp = params.train.model_copy(update={"pooling": pooling, "experts": ["bench"]})
            torch.manual_seed(0)
            model = build_model(tp, data.expert_dims, data.text_dim).to(device)
            loss_fn = build_loss(tp).to(device)
            optimizer = build_optimizer(tp, model, loss_fn)
            loader, sampler = train_loader(
                data, batch_size=tp.batch_size, seed=0, num_workers=workers, device=device
            )
            step = functools.partial(
                train_epoch,
                model=model,
                loss_fn=loss_fn,
                optimizer=optimizer,
                loader=loader,
                device=device,
                precision=Precision.create(tp.precision, device),
                epoch=1,
                epochs=1,
                run_name=f"stream-{pooling}",
                last_path=work / "none.pt",
            )
            with PeakMemory() as memory:
                # Start-up and first batches, on other clips than the measured ones (epoch 1
                # shuffles differently), so the measured steps read only uncached clips.
                sampler.set_epoch(1)
                step(max_steps=args.stream_warmup)
                sampler.set_epoch(2)
                _, busy, wait, clips = step(max_steps=args.stream_steps)
            read = psutil.disk_io_counters()
            side["poolings"][pooling] = {
                "clips_per_s": round(clips / busy, 1),
                "data_wait_fraction": round(wait / busy, 4),
                "peak_rss_gib": round(memory.peak_rss / GIB, 3),
                "peak_pss_gib": round(memory.peak_pss / GIB, 3),
                "seconds": round(busy, 1),
            }
            del loader
            data.close()
            print(
                f"streaming {pooling}, {workers} workers: {side['poolings'][pooling]} "
                f"(the machine's disk reads so far {read.read_bytes / GIB:.1f} GiB)",
                file=sys.stderr,
                flush=True,
            )
    return out


class PeakMemory:
    """Samples the memory of this process and its children (DataLoader workers) in a thread:
    summed RSS (pages shared by forked workers counted once per process: an over-estimate) and
    summed PSS (each shared page split between its sharers: the memory the job really holds)."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak_rss = 0
        self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _pss(pid: int) -> int:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _sample(self) -> None:
        import psutil

        me = psutil.Process()
        rss = pss = 0
        for process in [me, *me.children(recursive=True)]:
            try:
                rss += process.memory_info().rss
                pss += self._pss(process.pid)
            except (psutil.Error, OSError):
                pass  # a worker that just exited
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def metrics_time() -> dict[str, Any]:
    import numpy as np

    from atric.metrics import retrieval_metrics

    rng = np.random.default_rng(0)
    sim = rng.standard_normal((5000, 1000)).astype(np.float32)
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        retrieval_metrics(sim, captions_per_clip=5)
        times.append(time.perf_counter() - t0)
    return {
        "captions": 5000,
        "clips": 1000,
        "metrics_ms_median": round(1000 * statistics.median(times), 1),
        "metrics_ms_min": round(1000 * min(times), 1),
        "target_ms": 20,
    }


# ------------------------------------------------------------------ tables and plot for people
DATA_LABELS = {"default_corpus": "default corpus", "audiocaps_shaped": "AudioCaps-shaped"}
CLIP_SUFFIX = " (clip sampling)"


def _side_by_side_rows(side: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(data label, pooling, row) for every side-by-side row in the order the benchmark runs them
    (the JSON's keys are sorted): datasets as DATA_LABELS lists them, pairs rows before clip
    batching, poolings as BASE_POOLINGS lists them."""
    order = {name: i for i, name in enumerate([*DATA_LABELS, *BASE_POOLINGS])}
    rows = []
    for name in sorted(side["runs"], key=lambda n: order.get(n, len(order))):
        by_key = side["runs"][name]
        for clip in (False, True):
            keys = [key for key in by_key if key.endswith(CLIP_SUFFIX) == clip]
            for key in sorted(keys, key=lambda k: order.get(k.removesuffix(CLIP_SUFFIX), len(order))):
                label = DATA_LABELS.get(name, name) + (", clip batching" if clip else "")
                rows.append((label, key.removesuffix(CLIP_SUFFIX), by_key[key]))
    return rows


def markdown_tables(report: dict[str, Any]) -> str:
    """The report's comparisons as Markdown tables (what the README's Performance section shows)."""
    load = report["load"]
    out = [f"Load: `{load['uptime_before']}` -> `{load['uptime_after']}`; {load['cpu_count']} cores."]
    side = report.get("side_by_side")
    if side:
        out += [
            "",
            f"One run alone, against {side['baseline']}"
            + (f" (clip batching against {side['clip baseline']})" if "clip baseline" in side else "")
            + ":",
            "",
            "| data | pooling | baseline | captions/s baseline | captions/s now | now / baseline "
            "| per CPU second, now / baseline | data wait baseline / now |",
            "|---|---|---|---:|---:|---:|---:|---:|",
        ]
        for label, pooling, row in _side_by_side_rows(side):
            base, now = row["baseline"], row["current"]
            out.append(
                f"| {label} | {pooling} | {row.get('baseline_revision', side['baseline'])} "
                f"| {base['captions_per_s']:,.0f} | {now['captions_per_s']:,.0f} "
                f"| {row['speedup_captions_per_s']:.2f}x "
                f"| {row['speedup_captions_per_cpu_second']:.2f}x "
                f"| {100 * base['data_wait_fraction']:.1f}% / {100 * now['data_wait_fraction']:.1f}% |"
            )
        if side.get("two_at_once"):
            out += ["", "Two runs of a side started together (the machine's summed captions/s):", "",
                    "| pooling | baseline | now | now / baseline |", "|---|---:|---:|---:|"]
            for pooling, pair in side["two_at_once"].items():
                out.append(
                    f"| {pooling} | {pair['baseline']['captions_per_s_together']:,.0f} "
                    f"| {pair['current']['captions_per_s_together']:,.0f} "
                    f"| {pair['speedup_captions_per_s_together']:.2f}x |"
                )
        if side.get("under_load"):
            title = "Epoch seconds idle and beside the benchmark's 2-core load (goal: loaded <= 2x idle):"
            out += ["", title, "", "| pooling | side | idle | loaded | loaded / idle |",
                    "|---|---|---:|---:|---:|"]
            for pooling, sides in side["under_load"].items():
                for name in ("baseline", "current"):
                    entry = sides[name]
                    out.append(
                        f"| {pooling} | {name} | {entry['idle_epoch_seconds']:.2f} "
                        f"| {entry['loaded_epoch_seconds']:.2f} "
                        f"| {entry['loaded_over_idle']:.2f}x |"
                    )
    stream = report.get("streaming")
    if stream:
        shape = f"{stream['clips']:,} clips of {stream['frames']} x {stream['dim']}"
        out += ["", f"{shape} streamed from a cold page cache:", "",
                "| num_workers | pooling | clips/s | data wait | peak PSS GiB |", "|---|---|---:|---:|---:|"]
        for workers, entry in stream["by_num_workers"].items():
            for pooling, run in entry["poolings"].items():
                out.append(
                    f"| {workers} | {pooling} | {run['clips_per_s']:,.0f} "
                    f"| {100 * run['data_wait_fraction']:.1f}% "
                    f"| {run['peak_pss_gib']:.2f} |"
                )
    metrics = report["metrics"]
    out += ["", f"Metrics, {metrics['captions']:,} x {metrics['clips']:,} both directions: "
            f"{metrics['metrics_ms_median']} ms median (min {metrics['metrics_ms_min']}; "
            f"goal < {metrics['target_ms']} ms)."]
    return "\n".join(out) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """Speed-up per row (captions/s and per CPU second, the 2x goal drawn) and loaded/idle per side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from atric.atomic import atomic_path

    side = report["side_by_side"]
    rows = _side_by_side_rows(side)
    loaded = side.get("under_load", {})
    fig, (speed, load) = plt.subplots(
        1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 1] if loaded else [1, 0.001]}
    )
    xs = range(len(rows))
    width = 0.4
    speed.bar([x - width / 2 for x in xs], [r["speedup_captions_per_s"] for _, _, r in rows], width,
              label="captions/s")
    speed.bar([x + width / 2 for x in xs], [r["speedup_captions_per_cpu_second"] for _, _, r in rows], width,
              label="captions per CPU second")
    speed.axhline(1.0, color="grey", linewidth=0.8)
    speed.axhline(2.0, color="red", linestyle="--", linewidth=0.8, label="goal (2x)")
    tick_labels = [f"{label}\n{pooling}" for label, pooling, _ in rows]
    speed.set_xticks(list(xs), tick_labels, rotation=60, ha="right", fontsize=7)
    clip_baseline = f"; clip batching {side['clip baseline']}" if "clip baseline" in side else ""
    speed.set_ylabel(f"now / baseline ({side['baseline']}{clip_baseline})")
    speed.set_title("One training run alone, side by side")
    speed.legend(fontsize=8)
    if loaded:
        poolings = list(loaded)
        for offset, name in ((-width / 2, "baseline"), (width / 2, "current")):
            load.bar([i + offset for i in range(len(poolings))],
                     [loaded[p][name]["loaded_over_idle"] for p in poolings], width, label=name)
        load.axhline(2.0, color="red", linestyle="--", linewidth=0.8, label="goal (<= 2x)")
        load.set_xticks(range(len(poolings)), poolings)
        load.set_ylabel("loaded / idle epoch seconds")
        load.set_title("Beside a 2-core load")
        load.legend(fontsize=8)
    else:
        load.set_axis_off()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def render(report: dict[str, Any], out: Path) -> None:
    """Beside the JSON at ``out``: its .md tables and, when there is a side-by-side run, its .png plot."""
    from atric.atomic import write_text_atomic

    write_text_atomic(out.with_suffix(".md"), markdown_tables(report))
    if report.get("side_by_side"):
        plot(report, out.with_suffix(".png"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", help="git revision to compare against side by side (e.g. cc6cc6f, main when the issue was filed)")
    parser.add_argument(
        "--epochs", type=int, default=4, help="epochs per side-by-side run (the first is not averaged)"
    )
    parser.add_argument("--poolings", nargs="+", default=list(BASE_POOLINGS))
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="runs per side and row, alternating; the median run is reported",
    )
    parser.add_argument(
        "--load-poolings",
        nargs="*",
        default=["mean", "netvlad"],
        help="poolings also timed beside a competing 2-core load",
    )
    parser.add_argument(
        "--together-poolings",
        nargs="*",
        default=["mean", "netvlad"],
        help="poolings also timed as two runs started together per side (the machine's total)",
    )
    parser.add_argument("--clip-sampling", action="store_true", help="also the paper's clip batching")
    parser.add_argument(
        "--clip-baseline", help="baseline revision of the clip-batching rows (default: --baseline; it must have it)"
    )
    parser.add_argument(
        "--clips", type=int, default=3000, help="AudioCaps-shaped train clips side by side (0: none)"
    )
    parser.add_argument("--val-clips", type=int, default=300)
    parser.add_argument(
        "--stream-clips", type=int, default=0, help="streamed clips (AudioCaps: 50000, ~12 GiB)"
    )
    parser.add_argument("--stream-steps", type=int, default=60)
    parser.add_argument("--stream-warmup", type=int, default=3, help="unmeasured steps first (workers start)")
    parser.add_argument("--stream-poolings", nargs="+", default=["mean", "netvlad"])
    parser.add_argument(
        "--num-workers", type=int, nargs="+", default=[0, 2],
        help="train.num_workers values compared when streaming (0: the default background thread)",
    )  # fmt: skip
    parser.add_argument("--stream-dir", help="keep the streamed clips here and reuse them (default: a temp folder)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tmp-dir", default=None, help="where benchmark data goes (default: system temp)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--src", help=argparse.SUPPRESS)
    parser.add_argument("--params", help=argparse.SUPPRESS)
    parser.add_argument("--overrides", default="[]", help=argparse.SUPPRESS)
    parser.add_argument(
        "--render", action="store_true", help="only write --out's .md tables and .png plot again from its JSON"
    )
    args = parser.parse_args()
    if args.child:
        return child(args)
    sys.path.insert(0, str(ROOT / "src"))
    if args.render:
        render(json.loads(args.out.read_text()), args.out)
        return 0

    import atric  # noqa: F401  (before torch: it sets the OpenMP wait policy)

    # isort: split
    import torch

    report: dict[str, Any] = {
        "load": {
            "uptime_before": uptime(),
            "cpu_count": os.cpu_count(),
            "torch_threads_here": torch.get_num_threads(),
            "omp_wait_policy_of_the_user": USER_OMP_WAIT_POLICY,
        },
    }
    with tempfile.TemporaryDirectory(dir=args.tmp_dir, prefix="atric-bench-") as tmp:
        work = Path(tmp)
        if args.baseline:
            report["side_by_side"] = side_by_side(args, work)
        if args.stream_clips:
            report["streaming"] = streaming(args, work)
    report["metrics"] = metrics_time()
    report["load"]["uptime_after"] = uptime()
    from atric.atomic import write_json_atomic

    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, report)
    render(report, args.out)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
