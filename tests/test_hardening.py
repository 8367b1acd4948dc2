"""Hostile and careless use (issue #14): one owner per run, no unrestricted unpickling, bounded
work from small inputs, secrets redacted, one-line errors with exit 2, no litter."""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import fakes  # noqa: E402

from atric import atomic  # noqa: E402
from atric.config import Params  # noqa: E402
from atric.engine import checkpoint as ckpt  # noqa: E402
from atric.errors import CheckpointError  # noqa: E402
from atric.ops import runlock, tracking  # noqa: E402
from atric.ops.experiment import PREVIOUS_RUNS_DIR  # noqa: E402
from atric.redact import redact  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "src" / "train.py"
EVALUATE = REPO / "src" / "evaluate.py"
RUN = "fa-netrvlad"  # run_name_for(fakes.tiny_params)
SECRET = "s3cr3t-pw"




def _params_file(data_root: Path, out: Path, **train: object) -> Path:
    raw = fakes.tiny_params(out, **train)
    raw["data"]["root"] = str(data_root / "data")
    return fakes.write_params(out / "params.yaml", raw)


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO / "src"),
        "OMP_NUM_THREADS": "1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        **extra,
    }
    return env


def _mlflow_runs(tmp_path: Path) -> list[tuple[str, str, dict[str, str]]]:
    """(run name, status, tags) of every run in the test's MLflow store."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = []
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id]):
            runs.append((run.info.run_name, run.info.status, dict(run.data.tags)))
    return runs


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


# ------------------------------------------------------------------ 1. one owner per run
@pytest.mark.slow  # a subprocess kill/restart or several stage processes: make test only
def test_second_training_of_a_run_fails_at_once_naming_the_holder_and_a_killed_holder_is_taken_over(
    data_root: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    params = _params_file(data_root, out, epochs=400)
    env = _env(tmp_path)
    command = [sys.executable, str(TRAIN), "--params", str(params)]
    _, holder_file = runlock.lock_paths(out / "models", RUN)
    first = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        history = out / "metrics" / "history" / f"{RUN}.json"
        run_file = out / "models" / RUN / tracking.RUN_ID_FILE  # its MLflow run opens beside epoch 1
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and first.poll() is None and not (history.exists() and run_file.exists()):
            time.sleep(0.05)
        assert first.poll() is None, first.stderr.read().decode() if first.stderr else ""
        holder = json.loads(holder_file.read_text())
        assert holder["pid"] == first.pid

        second = subprocess.run(
            [*command, "--set", "train.lr=0.02"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
        )
        assert second.returncode == 2
        line = _one_error_line(second.stderr)
        assert f"in use by train pid {first.pid} on {socket.gethostname()} since {holder['started']}" in line
        # The refused process created no MLflow run and did not touch the run's files.
        assert [name for name, _, _ in _mlflow_runs(tmp_path)] == [RUN]
        evaluation = subprocess.run(
            [sys.executable, str(EVALUATE), "--params", str(params)],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert evaluation.returncode == 2 and f"pid {first.pid}" in _one_error_line(evaluation.stderr)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    assert holder_file.exists()  # a SIGKILLed holder leaves its record behind

    third = subprocess.run(
        [*command, "--restart", "--set", "train.epochs=1"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"taking over the stale lock of train pid {first.pid}" in third.stderr
    assert not holder_file.exists()  # released on exit


def test_run_lock_is_exclusive_across_processes_and_reentrant_within_one(tmp_path: Path) -> None:
    script = (
        "import sys, time\n"
        "from atric.ops.runlock import run_lock\n"
        "with run_lock(sys.argv[1], 'x-mean', 'tune trial 3'):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(120)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)], env=_env(tmp_path), cwd=tmp_path, stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        with pytest.raises(runlock.RunLockedError, match=rf"x-mean: run is in use by tune trial 3 pid {child.pid} on "):
            with runlock.run_lock(tmp_path, "x-mean", "train"):
                pass
        with runlock.run_lock(tmp_path, "x-other", "train"):  # another run is free
            with runlock.run_lock(tmp_path, "x-other", "train"):  # re-entrant in one process
                pass
    finally:
        child.kill()
        child.wait(timeout=30)
    with runlock.run_lock(tmp_path, "x-mean", "train") as holder:
        assert holder.pid == os.getpid()
    assert not list((tmp_path / runlock.LOCKS_DIR).glob("*.holder.json"))


def test_locks_live_outside_the_run_output_and_dvc_ignores_them() -> None:
    lock, holder = runlock.lock_paths("models", "logmel-mean")
    assert Path("models/logmel-mean") not in lock.parents
    ignored = (REPO / ".dvcignore").read_text().split()
    assert f"{runlock.LOCKS_DIR}/" in ignored and tracking.RUN_ID_FILE in ignored and ".*.tmp" in ignored
    # Checkpoints set aside by --pipeline are local history: in the hash of the index stage's
    # `models` dependency they made dvc.lock differ from a fresh clone's.
    assert f"{PREVIOUS_RUNS_DIR}/" in ignored


# ------------------------------------------------------------------ 2. no unrestricted unpickling
UNSAFE_LOADS = [
    (re.compile(r"\bpickle\.loads?\("), "pickle.load"),
    (re.compile(r"\bKeyedVectors\.load\("), "KeyedVectors.load"),
    (re.compile(r"\bjoblib\.load\("), "joblib.load"),
    (re.compile(r"\bread_pickle\("), "pandas read_pickle"),
    (re.compile(r"\b(?:cloudpickle|dill)\.loads?\("), "cloudpickle/dill"),
    (re.compile(r"allow_pickle\s*=\s*True"), "np.load(allow_pickle=True)"),
    (re.compile(r"\bmlflow\.pytorch\.load_model\("), "mlflow.pytorch.load_model"),
]


def test_no_unrestricted_unpickling_in_the_code_base() -> None:
    """Outside the restricted unpickler (atric/legacy.py), no call that runs code from a file."""
    offenders = []
    for path in sorted((REPO / "src").rglob("*.py")):
        if path == REPO / "src" / "atric" / "legacy.py":
            continue
        text = path.read_text(encoding="utf-8")
        for pattern, what in UNSAFE_LOADS:
            offenders += [f"{path.relative_to(REPO)}: {what}" for _ in pattern.finditer(text)]
        for match in re.finditer(r"\btorch\.load\(", text):
            call = text[match.start() : text.find(")", match.end()) + 1]
            if "weights_only=True" not in call:
                offenders.append(f"{path.relative_to(REPO)}: torch.load without weights_only=True")
    assert offenders == []


class _RunsShell:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {MARKER}",))


MARKER = Path("/tmp/atric-pickle-payload-ran")


def test_word_vector_cache_is_plain_arrays_and_a_replaced_file_runs_nothing(tmp_path: Path) -> None:
    from atric.config import TextParams, Word2VecParams
    from atric.layout import Clip, Layout, write_index
    from atric.text import vectors

    layout = Layout("Fake", tmp_path / "data")
    clips = [Clip(f"c{i}", (f"a dog barks {i}", "then a car passes")) for i in range(3)]
    write_index(layout.index_path("train"), clips, "train")
    text = TextParams(vectors="train", cache_dir=str(tmp_path / "cache"), word2vec=Word2VecParams(vector_size=4, epochs=1))
    built = vectors.load_trained(layout, text)
    (folder,) = [p for p in (tmp_path / "cache").iterdir()]
    assert sorted(p.name for p in folder.iterdir()) == ["vectors.npy", "vocab.json"]
    again = vectors.load_trained(layout, text)
    assert again.from_cache and isinstance(again.kv.vectors, np.memmap)
    dog = np.array(built.kv["dog"])  # a copy: the memory map sees the file we overwrite below
    assert np.array_equal(again.kv["dog"], dog)

    MARKER.unlink(missing_ok=True)
    for name in ("vectors.npy", "vocab.json"):
        (folder / name).write_bytes(pickle.dumps(_RunsShell()))
        rebuilt = vectors.load_trained(layout, text)  # refused as data, rebuilt, no code run
        assert not MARKER.exists()
        assert not rebuilt.from_cache and np.array_equal(rebuilt.kv["dog"], dog)
    (folder / "vectors.npy").unlink()
    (folder / "vectors.kv").write_bytes(pickle.dumps(_RunsShell()))  # gensim's old pickle format
    assert not vectors.load_trained(layout, text).from_cache and not MARKER.exists()


# ------------------------------------------------------------------ 3. bounded work
def _nested(depth: int) -> list[object]:
    value: list[object] = [0]
    for _ in range(depth):
        value = [value, value]  # shared references: tiny on disk, 2**depth leaves when expanded
    return value


def test_crafted_checkpoint_signature_is_refused_quickly_with_a_short_message(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    torch.save({"format": ckpt.CHECKPOINT_FORMAT, "epoch": 1, "signature": {"train.lr": _nested(60)}}, path)
    assert path.stat().st_size < 250_000
    with pytest.raises(CheckpointError, match="nested deeper than") as caught:
        ckpt.load_checkpoint(path)
    assert len(str(caught.value)) < 500
    # The comparison the engine makes is bounded too (signature handed over unchecked).
    lines = ckpt.signature_differences({"train.lr": _nested(18), "train.seed": 1}, {"train.lr": 0.01})
    assert sum(len(line) for line in lines) < 2000
    wide = {f"k{i}": "x" * 5000 for i in range(500)}
    lines = ckpt.signature_differences(wide, {})
    assert len(lines) == ckpt.MAX_DIFFERENCE_LINES + 1 and sum(map(len, lines)) < 20_000


# ------------------------------------------------------------------ 4. secrets redacted
@pytest.mark.parametrize(
    ("text", "hidden"),
    [
        (f"http://user:{SECRET}@mlflow.example:5000/api", "http://user:***@mlflow.example:5000/api"),
        (f"postgresql+psycopg2://atric:{SECRET}@db/optuna", "postgresql+psycopg2://atric:***@db/optuna"),
        (f"endpoint https://key:{SECRET}@s3.local:8333 down", "endpoint https://key:***@s3.local:8333 down"),
        (f"s3://b/k?X-Amz-Signature={SECRET}&x=1", "s3://b/k?X-Amz-Signature=***&x=1"),
        ("http://user@host:5000 and sqlite:///mlruns/mlflow.db", "http://user@host:5000 and sqlite:///mlruns/mlflow.db"),
        # Any character in a password: "/" and "@" unencoded (the URL's last "@" ends it), or encoded.
        ("postgresql://atric:pa/ss:w@rd@127.0.0.1:5432/optuna down", "postgresql://atric:***@127.0.0.1:5432/optuna down"),
        ("postgresql://atric:pa%2Fss%20w%40rd@db/optuna", "postgresql://atric:***@db/optuna"),
        ("the champion is models:/atric-SynthCaps@champion", "the champion is models:/atric-SynthCaps@champion"),
    ],
)
def test_redact_masks_passwords_and_secret_query_values(text: str, hidden: str) -> None:
    assert redact(text) == hidden


def test_a_storage_password_is_masked_in_every_form_a_driver_prints(monkeypatch: pytest.MonkeyPatch) -> None:
    """A password holding "/" and a space, URL-encoded in ATRIC_OPTUNA_STORAGE: drivers print it
    decoded ("password authentication failed ... p/ss word"), outside any URL."""
    from atric.config import Params
    from atric.ops.tuning import storage_url

    monkeypatch.setenv("ATRIC_OPTUNA_STORAGE", "postgresql://atric:p%2Fss%20word@db/optuna")
    assert redact("FATAL: password 'p/ss word' rejected") == "FATAL: password '***' rejected"
    assert redact("postgresql://atric:p/ss word@db/optuna") == "postgresql://atric:***@db/optuna"
    monkeypatch.delenv("ATRIC_OPTUNA_STORAGE")
    # Given on the command line (--storage, tune.storage) instead: registered when it is read.
    storage_url(Params.model_validate({"tune": {"storage": "postgresql://atric:s3cr%2Ft%20x@db/o"}}))
    assert redact("auth failed for s3cr/t x and s3cr%2Ft%20x") == "auth failed for *** and ***"


def test_redact_masks_secret_environment_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    assert redact(f"signature of {SECRET} does not match") == "signature of *** does not match"


def test_tracking_uri_with_password_never_printed(data_root: Path, tmp_path: Path) -> None:
    """MLflow unreachable at a URI with credentials: one error line, exit 2, no password."""
    params = _params_file(data_root, tmp_path, epochs=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    env = _env(tmp_path, MLFLOW_TRACKING_URI=f"http://atric:{SECRET}@127.0.0.1:{port}",
               MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="2")  # fmt: skip
    done = subprocess.run(
        [sys.executable, str(TRAIN), "--params", str(params)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 2, done.stderr[-3000:]
    line = _one_error_line(done.stderr)
    assert f"http://atric:***@127.0.0.1:{port}" in line
    assert SECRET not in done.stderr + done.stdout


def test_params_tags_and_failure_reason_in_mlflow_are_redacted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError):
        with tracking.tracked_run(
            "Fake", "r-mean", tmp_path / "r-mean",
            params={"text.vectors": f"https://u:{SECRET}@vectors.example/w2v.bin"},
            tags={"endpoint": f"http://k:{SECRET}@s3:8333"},
        ):  # fmt: skip
            raise RuntimeError(f"upload to http://k:{SECRET}@s3:8333 failed")
    from mlflow import MlflowClient

    client = MlflowClient(tracking.tracking_uri())  # the run was logged by the TrackingProcess, from the env
    (run,) = client.search_runs([client.get_experiment_by_name("Fake").experiment_id])
    assert run.info.status == "FAILED"
    shown = json.dumps([run.data.params, run.data.tags])
    assert SECRET not in shown and "https://u:***@vectors.example" in shown
    assert run.data.tags[tracking.FAILURE_TAG] == "RuntimeError: upload to http://k:***@s3:8333 failed"


def test_storage_errors_redact_the_endpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from atric.ops import storage

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://key:{SECRET}@127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    local = tmp_path / "f.bin"
    local.write_bytes(b"x")
    with pytest.raises(storage.StorageError) as caught:
        storage.upload(local, "s3://bucket/f.bin", policy=storage.RetryPolicy(attempts=1, base_delay=0))
    assert SECRET not in str(caught.value)


# ------------------------------------------------------------------ 5. one-line errors, exit 2
def test_unknown_expert_is_named_and_creates_no_mlflow_run(data_root: Path, tmp_path: Path) -> None:
    params = _params_file(data_root, tmp_path, epochs=1)
    env = _env(tmp_path)
    for script in (TRAIN, EVALUATE):
        done = subprocess.run(
            [sys.executable, str(script), "--params", str(params), "--expert", "mfcc"],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 2
        assert "unknown expert 'mfcc': not a registered audio expert" in _one_error_line(done.stderr)
    assert _mlflow_runs(tmp_path) == []


@pytest.fixture()
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB file system: a checkpoint does not fit (needs root and mount; else skipped:
    the in-process ENOSPC test below covers the same code everywhere)."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_during_checkpoint_save_is_one_line_and_the_run_is_failed(
    data_root: Path, tmp_path: Path, small_tmpfs: Path
) -> None:
    params = _params_file(data_root, tmp_path, epochs=1, models_dir=str(small_tmpfs), embed_dim=64)
    done = subprocess.run(
        [sys.executable, str(TRAIN), "--params", str(params)], env=_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"no space left on {small_tmpfs} (writing {small_tmpfs / RUN}" in _one_error_line(done.stderr)
    leftovers = [p.name for p in (small_tmpfs / RUN).iterdir()]
    assert not [name for name in leftovers if name.endswith(".tmp")] and "last.pt" not in leftovers
    ((name, status, tags),) = _mlflow_runs(tmp_path)
    assert status == "FAILED" and "no space left on" in tags[tracking.FAILURE_TAG]


def test_disk_full_during_extraction_is_one_line_not_a_crash(tmp_path: Path, small_tmpfs: Path) -> None:
    """The first feature shard does not fit: "no space left" and exit 2 (a shard HDF5 failed
    mid-write once left h5py objects that segfaulted the interpreter at exit, 3 of 3)."""
    from test_extract import make_corpus

    layout = make_corpus(tmp_path / "corpus", durations=[2.0] * 12)
    features = small_tmpfs / "logmel.h5"
    script = (
        "import sys\n"
        "from atric.cli import run\n"
        "from atric.features.base import build_expert\n"
        "from atric.features.extract import extract_features\n"
        "from atric.layout import Layout, read_manifest\n"
        f"layout = Layout({layout.dataset!r}, {str(layout.root)!r})\n"
        f"layout.features_path = lambda expert, split: __import__('pathlib').Path({str(features)!r})\n"
        "run(lambda: extract_features(read_manifest(layout.manifest_path), layout, build_expert('logmel', {}),"
        " 'train', batch_size=12, progress=False) and 0)\n"
    )
    for attempt in (1, 2):  # and again, resuming from what fitted
        done = subprocess.run([sys.executable, "-c", script], env=_env(tmp_path), capture_output=True, text=True, timeout=180)
        assert done.returncode == 2, (attempt, done.returncode, done.stderr[-3000:])
        assert f"no space left on {small_tmpfs}" in _one_error_line(done.stderr)
        assert "Traceback" not in done.stderr and "h5py" not in done.stderr
    assert not list(small_tmpfs.rglob("*.tmp"))


def test_enospc_and_read_only_writes_become_output_errors_without_temp_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "out" / "last.pt"
    for code, message in ((errno.ENOSPC, "no space left on "), (errno.EROFS, "read-only file system")):
        def fail(*args: object, _code: int = code) -> None:
            raise OSError(_code, os.strerror(_code))

        with monkeypatch.context() as patch:
            patch.setattr(os, "fsync", fail)
            with pytest.raises(atomic.OutputError, match=message):
                ckpt.save_checkpoint(target, {"format": 1})
        assert list(target.parent.iterdir()) == []


def test_read_only_output_folder_is_refused_before_any_mlflow_run(data_root: Path, tmp_path: Path) -> None:
    read_only = tmp_path / "ro"
    read_only.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(read_only)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here (root chmod cannot make a folder read-only)")
    try:
        params = _params_file(data_root, tmp_path, epochs=1, models_dir=str(read_only / "models"))
        done = subprocess.run(
            [sys.executable, str(TRAIN), "--params", str(params)], env=_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=180
        )
    finally:
        subprocess.run(["umount", "-l", str(read_only)], check=False)
    assert done.returncode == 2
    assert f"cannot write {read_only / 'models'}" in _one_error_line(done.stderr)
    assert "read-only file system" in done.stderr
    assert _mlflow_runs(tmp_path) == []


# ------------------------------------------------------------------ 6. no litter
def test_a_killed_writes_temp_files_are_removed_when_the_run_starts_again(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from atric.ops.experiment import train_tracked

    raw = fakes.tiny_params(tmp_path, epochs=1)
    raw["data"]["root"] = str(data_root / "data")
    params = Params.model_validate(raw)
    run_dir = tmp_path / "models" / RUN
    run_dir.mkdir(parents=True)
    stale = [run_dir / ".last.pt.k1ll3d.tmp", tmp_path / "metrics" / f".{RUN}.json.abc.tmp"]
    other = tmp_path / "metrics" / ".other-run.json.abc.tmp"  # another run's: not ours to remove
    for path in [*stale, other]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)  # the local store's artifacts go to ./mlruns
    train_tracked(params, log_model=False)
    assert not any(path.exists() for path in stale) and other.exists()
    assert not list(run_dir.glob("*.tmp"))


def test_failed_write_leaves_no_temp_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        with atomic.atomic_path(tmp_path / "x.json") as tmp:
            tmp.write_text("half")
            raise ValueError("stop")
    assert list(tmp_path.iterdir()) == []


def test_log_records_are_redacted(caplog: pytest.LogCaptureFixture) -> None:
    from atric.redact import install_log_redaction

    install_log_redaction()
    with caplog.at_level(logging.INFO):
        logging.getLogger("atric.test").warning("MLflow at %s unreachable", f"http://u:{SECRET}@h:1")
    assert SECRET not in caplog.text and "http://u:***@h:1" in caplog.text


# ------------------------------------------------------------------ 3. bounded audio
def test_audio_query_reads_only_what_the_model_uses_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import soundfile as sf

    from atric.search import searcher

    rate = 8000
    path = tmp_path / "hour.wav"
    with sf.SoundFile(path, "w", samplerate=rate, channels=1, subtype="PCM_16") as fh:
        block = (0.1 * np.sin(np.arange(rate * 60) / 10)).astype(np.float32)
        for _ in range(60):  # one hour, written a minute at a time
            fh.write(block)
    seconds = searcher.max_query_seconds({"logmel": 30, "aisfx": 10}, {"logmel": 0.2, "aisfx": 0.56})
    assert seconds == pytest.approx(30 * 0.2 + searcher.QUERY_WINDOW_MARGIN_SECONDS)  # the longer of the two
    asked: list[int] = []
    real_read = sf.read
    monkeypatch.setattr(sf, "read", lambda *a, **k: asked.append(k.get("frames", -1)) or real_read(*a, **k))
    with caplog.at_level(logging.WARNING, logger="atric.search"):
        audio = searcher.read_query_audio(path, 16000, seconds)
    assert asked == [int(np.ceil(seconds * rate))]  # decoded: the cut, never the hour
    assert audio.shape == (int(np.ceil(seconds * rate)) * 2,)
    assert f"3600.0 s long; only its first {seconds:.1f} s are used" in caplog.text


def test_prepare_refuses_audio_longer_than_data_max_audio_seconds(tmp_path: Path) -> None:
    from test_importers import make_clotho_tree

    make_clotho_tree(tmp_path / "raw")
    fakes.write_params(tmp_path / "params.yaml", {"data": {"raw_dir": "raw", "root": "data", "source": "clotho"}})
    done = subprocess.run(
        [sys.executable, str(REPO / "src" / "prepare.py"), "--params", "params.yaml", "--set", "data.max_audio_seconds=0.01"],
        cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    line = _one_error_line(done.stderr)
    assert "longer than data.max_audio_seconds=0.01: " in line and ".wav (" in line
    assert not (tmp_path / "data" / "CLOTHO" / "manifest.json").exists()


# ------------------------------------------------------------------ 8. extract re-validates what it reuses
def test_extract_recomputes_reused_clips_that_are_nan_wrong_dim_or_1d(tmp_path: Path) -> None:
    import h5py
    from test_extract import Counting, make_corpus, read_all
    from test_extract import run as extract

    from atric.features import build_expert
    from atric.features.extract import FINGERPRINT_ATTR

    logmel = build_expert("logmel", {})
    layout = make_corpus(tmp_path / "data")
    extract(layout, logmel)
    path = layout.features_path("logmel", "train")
    good = read_all(path)
    bad = {"c1": np.full_like(good["c1"], np.nan), "c2": good["c2"][:, :5], "c3": good["c3"][0]}
    with h5py.File(path, "r+") as h5:
        for clip_id, value in bad.items():
            fingerprint = h5[clip_id].attrs[FINGERPRINT_ATTR]
            del h5[clip_id]
            h5.create_dataset(clip_id, data=value).attrs[FINGERPRINT_ATTR] = fingerprint
    counting = Counting(logmel)
    report = extract(layout, counting)
    assert not report.up_to_date and counting.clips == 3 and report.reused == 4
    again = read_all(path)
    assert all(np.array_equal(again[k], good[k]) for k in good)
