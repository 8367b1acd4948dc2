"""Training loop, checkpoints, resume and evaluation on a tiny fake layout (atric.engine)."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import fakes

from atric import engine, factory
from atric.engine import loop
from atric.errors import AtricError, CheckpointError, ConfigError, DataError
from atric.layout import Layout
from atric.model import POOLINGS

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")




make_params = fakes.fake_params


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("loss", ["max_margin", "infonce"])
def test_train_writes_checkpoints_and_metrics(data_root: Path, tmp_path: Path, loss: str) -> None:
    params = make_params(data_root, tmp_path, loss=loss, epochs=2)
    result = engine.train(params)
    assert result.run_name == "fa-netrvlad"
    paths = result.paths
    for path in (paths.best, paths.last, paths.metrics, paths.history):
        assert path.exists(), path
    history = read_json(paths.history)
    assert [row["epoch"] for row in history] == [1, 2]
    assert {"epoch", "train_loss", "lr", "val_t2a_R1", "val_t2a_R10", "val_a2t_R10", "val_t2a_mAP10"} <= set(
        history[0]
    )
    assert history[1]["lr"] == pytest.approx(0.01 * 0.95)  # StepLR stepped once per epoch
    summary = read_json(paths.metrics)
    best = max(history, key=lambda row: row["val_t2a_geometric_mean"])
    assert summary["best_epoch"] == best["epoch"] == result.best_epoch
    assert summary["val_t2a_R1"] == best["val_t2a_R1"] == result.best_metrics["t2a_R1"]

    last = engine.load_checkpoint(paths.last)  # weights_only loading must work
    assert last["epoch"] == 2 and last["history"] == history
    assert last["model_config"]["expert_dims"] == {"fa": 8}
    best_ckpt = engine.load_checkpoint(paths.best)
    assert best_ckpt["epoch"] == result.best_epoch
    if loss == "infonce":
        # The learnable temperature is optimised (no weight decay) and saved.
        assert len(last["optimizer"]["param_groups"]) == 2
        assert last["optimizer"]["param_groups"][1]["weight_decay"] == 0.0
        log_scale = last["loss"]["log_scale"]
        assert float(log_scale) != pytest.approx(float(torch.log(torch.tensor(1 / 0.07))), abs=1e-6)

    test_metrics = engine.evaluate_checkpoint(params, result.run_name)
    assert test_metrics["epoch"] == result.best_epoch
    # The file also names the corpus it comes from (the report compares only runs of one corpus).
    identity = {"dataset": "Fake", "corpus": Layout("Fake", data_root / "data").corpus_fingerprint()}
    assert read_json(tmp_path / "metrics" / "test" / "fa-netrvlad.json") == {**test_metrics, **identity}
    assert {k: summary[k] for k in identity} == identity
    assert 0 <= test_metrics["t2a_R10"] <= 100


def test_same_seed_gives_identical_metrics(data_root: Path, tmp_path: Path) -> None:
    first = engine.train(make_params(data_root, tmp_path / "a", epochs=2))
    second = engine.train(make_params(data_root, tmp_path / "b", epochs=2))
    assert first.history == second.history
    other = engine.train(make_params(data_root, tmp_path / "c", epochs=2, seed=1))
    assert other.history != first.history  # the seed matters


class StopAfter:
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.seen: list[int] = []

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        self.seen.append(epoch)
        assert "val_t2a_R1" in metrics and metrics["epoch"] == epoch
        if epoch == self.epoch:
            raise KeyboardInterrupt("simulated kill")


def test_resume_in_process_matches_an_uninterrupted_run(data_root: Path, tmp_path: Path) -> None:
    settings = {"epochs": 4, "loss": "infonce", "pooling": "lstm"}
    full = engine.train(make_params(data_root, tmp_path / "full", **settings))
    interrupted = make_params(data_root, tmp_path / "cut", **settings)
    stopper = StopAfter(2)
    with pytest.raises(KeyboardInterrupt):
        engine.train(interrupted, callbacks=[stopper])
    assert stopper.seen == [1, 2]
    assert engine.load_checkpoint(tmp_path / "cut" / "models" / "fa-lstm" / "last.pt")["epoch"] == 2
    resumed = engine.train(interrupted, resume=True)
    assert resumed.resumed_from == 2 and resumed.epochs_run == 2
    assert resumed.history == full.history
    assert read_json(resumed.paths.metrics) == read_json(full.paths.metrics)
    full_best = engine.load_checkpoint(full.paths.best)["model"]
    resumed_best = engine.load_checkpoint(resumed.paths.best)["model"]
    assert all(torch.equal(full_best[k], resumed_best[k]) for k in full_best)


@pytest.mark.slow  # a subprocess kill/restart or several stage processes: make test only
def test_killed_subprocess_restarted_with_the_same_command_continues(data_root: Path, tmp_path: Path) -> None:
    settings = {"epochs": 5, "pooling": "netvlad"}
    raw = fakes.tiny_params(tmp_path / "killed", **settings)
    raw["data"]["root"] = str(data_root / "data")
    params_file = fakes.write_params(tmp_path / "params.yaml", raw)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPO / "src" / "train.py"), "--params", str(params_file)]
    history_path = tmp_path / "killed" / "metrics" / "history" / "fa-netvlad.json"

    fakes.kill_after_epochs(command, history_path, 2, env=env)
    killed_at = engine.load_checkpoint(tmp_path / "killed" / "models" / "fa-netvlad" / "last.pt")["epoch"]
    assert 2 <= killed_at < 5

    done = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"resuming after epoch {killed_at}" in done.stderr

    full = engine.train(make_params(data_root, tmp_path / "full", **settings))
    assert read_json(history_path) == full.history
    assert read_json(tmp_path / "killed" / "metrics" / "fa-netvlad.json") == read_json(full.paths.metrics)


def test_checkpoint_from_other_params_is_refused_until_restart(data_root: Path, tmp_path: Path) -> None:
    engine.train(make_params(data_root, tmp_path, epochs=1))
    changed = make_params(data_root, tmp_path, epochs=2, lr=0.02, embed_dim=4)
    with pytest.raises(
        CheckpointError,
        match=r"(?s)train\.embed_dim: checkpoint 8, now 4.*train\.lr: checkpoint 0\.01, now 0\.02.*--restart",
    ):
        engine.train(changed)
    result = engine.train(changed, restart=True)
    assert result.resumed_from == 0 and len(result.history) == 2
    # More epochs with the same params continue the run instead of refusing it.
    longer = engine.train(make_params(data_root, tmp_path, epochs=3, lr=0.02, embed_dim=4))
    assert longer.resumed_from == 2 and [row["epoch"] for row in longer.history] == [1, 2, 3]


def test_resume_without_checkpoint_is_an_error(data_root: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="nothing to resume"):
        engine.train(make_params(data_root, tmp_path), resume=True)


class NaNAtCall(nn.Module):
    """The real loss, but NaN from the n-th call on (as a diverging run would give)."""

    def __init__(self, inner: nn.Module, call: int) -> None:
        super().__init__()
        self.inner = inner
        self.call = call
        self.calls = 0

    def forward(self, sim: torch.Tensor, caption_clip: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        loss = self.inner(sim, caption_clip)
        return loss * float("nan") if self.calls >= self.call else loss


def test_nan_loss_stops_with_epoch_and_step_and_keeps_the_last_checkpoint(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = factory.build_loss
    steps_per_epoch = (24 * 5) // 16
    monkeypatch.setattr(loop, "build_loss", lambda tp: NaNAtCall(real(tp), steps_per_epoch + 3))
    params = make_params(data_root, tmp_path, epochs=3)
    with pytest.raises(
        AtricError, match=r"loss is nan at epoch 2, step 3.*last good checkpoint .*last\.pt is kept"
    ):
        engine.train(params)
    kept = engine.load_checkpoint(tmp_path / "models" / "fa-netrvlad" / "last.pt")
    assert kept["epoch"] == 1 and len(kept["history"]) == 1


def test_wrong_val_feature_dim_is_a_data_error(tmp_path: Path) -> None:
    fakes.write_fake_layout(tmp_path / "data", clips={"train": 8, "val": 4})
    fakes.write_fake_layout(tmp_path / "other", clips={"val": 4}, experts={"fa": 3})
    (tmp_path / "data" / fakes.DATASET / "AudioExpert" / "fa" / "val" / "fa.h5").unlink()
    (tmp_path / "other" / fakes.DATASET / "AudioExpert" / "fa" / "val" / "fa.h5").rename(
        tmp_path / "data" / fakes.DATASET / "AudioExpert" / "fa" / "val" / "fa.h5"
    )
    with pytest.raises(DataError, match=r"val/fa\.h5: feature dim is 3 .*expects 8"):
        engine.train(make_params(tmp_path, tmp_path, epochs=1))


@pytest.mark.parametrize("pooling", POOLINGS)
def test_every_pooling_trains(data_root: Path, tmp_path: Path, pooling: str) -> None:
    params = make_params(data_root, tmp_path, epochs=1, pooling=pooling, text_pooling=pooling)
    result = engine.train(params)
    assert result.run_name == f"fa-{pooling}" and len(result.history) == 1
    assert torch.isfinite(torch.tensor(result.history[0]["train_loss"]))


def test_two_experts_with_text_weighted_fusion(data_root: Path, tmp_path: Path) -> None:
    params = make_params(
        data_root, tmp_path, epochs=1, experts=["fb", "fa"], pooling="mean", fusion="text_weighted"
    )
    result = engine.train(params)
    assert result.run_name == "fb+fa-mean"
    config = engine.load_checkpoint(result.paths.best)["model_config"]
    assert config["expert_dims"] == {"fa": 8, "fb": 5} and config["fusion"] == "text_weighted"


def run_cli(script: str, args: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(sys, "argv", [script, *args])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "src" / script), run_name="__main__")
    return int(exit_info.value.code or 0)


def test_cli_unknown_pooling_exits_2_listing_valid_ones(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = fakes.tiny_params(tmp_path)
    raw["data"]["root"] = str(data_root / "data")
    params_file = fakes.write_params(tmp_path / "params.yaml", raw)
    assert run_cli("train.py", ["--params", str(params_file), "--pooling", "avg"], monkeypatch) == 2
    err = capsys.readouterr().err
    assert "unknown pooling 'avg'" in err and "mean, max, lstm, netvlad, netrvlad" in err
    assert not (tmp_path / "models").exists()


def test_cli_train_then_evaluate(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = fakes.tiny_params(tmp_path, epochs=1)
    raw["data"]["root"] = str(data_root / "data")
    params_file = fakes.write_params(tmp_path / "params.yaml", raw)
    common = ["--params", str(params_file)]
    assert run_cli("train.py", [*common, "--expert", "fb", "--pooling", "max"], monkeypatch) == 0
    assert (tmp_path / "models" / "fb-max" / "best.pt").exists()
    assert run_cli("evaluate.py", [*common, "--run", "fb-max", "--split", "val"], monkeypatch) == 0
    out = capsys.readouterr().out
    assert "R@10" in out and "t2a" in out and "a2t" in out
    saved = read_json(tmp_path / "metrics" / "val" / "fb-max.json")
    history = read_json(tmp_path / "metrics" / "history" / "fb-max.json")
    assert saved["t2a_R1"] == history[0]["val_t2a_R1"]  # evaluation = the validation of training
    assert run_cli("evaluate.py", [*common, "--run", "nope"], monkeypatch) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_a_checkpoint_copied_from_another_run_is_refused_naming_both(data_root: Path, tmp_path: Path) -> None:
    params = make_params(data_root, tmp_path, epochs=1)
    trained = engine.train(params)
    copied = tmp_path / "models" / "fa-mean" / "best.pt"
    copied.parent.mkdir(parents=True)
    copied.write_bytes(trained.paths.best.read_bytes())
    with pytest.raises(CheckpointError, match=r"fa-mean/best\.pt: holds run 'fa-netrvlad', not 'fa-mean' .*--run fa-netrvlad"):
        engine.evaluate_checkpoint(make_params(data_root, tmp_path, epochs=1, pooling="mean"), "fa-mean")
    assert not (tmp_path / "metrics" / "test" / "fa-mean.json").exists()


@pytest.mark.parametrize(("key", "value"), [("audio_clusters", 10_000_000), ("embed_dim", 1_000_000)])
def test_a_model_size_beyond_the_machine_is_refused_naming_the_key_before_allocating(
    data_root: Path, tmp_path: Path, key: str, value: int
) -> None:
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ConfigError, match=rf"train\.{key}={value}: the model would have [\d,]+ parameters, .* GiB to train"):
        engine.train(make_params(data_root, tmp_path, epochs=1, **{key: value}))
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: nothing allocated
    assert not (tmp_path / "models" / "fa-netrvlad" / "last.pt").exists()
    # Within memory, the count decides, not the value: twice the default trains.
    factory.check_model_size(make_params(data_root, tmp_path, **{key: 24}).train, {"fa": 8}, 6, memory_bytes=1 << 30)


def test_a_checkpoint_whose_compressed_tensor_would_inflate_far_beyond_the_file_is_refused(tmp_path: Path) -> None:
    import zipfile

    plain = tmp_path / "plain.pt"
    torch.save({"format": 1, "model": torch.zeros(16 << 20)}, plain)  # 64 MiB of zeros
    crafted = tmp_path / "crafted.pt"
    with zipfile.ZipFile(plain) as source, zipfile.ZipFile(crafted, "w", zipfile.ZIP_DEFLATED) as out:
        for info in source.infolist():
            out.writestr(info.filename, source.read(info.filename))
    assert crafted.stat().st_size < (1 << 20)
    with pytest.raises(CheckpointError, match=r"crafted\.pt: its entries declare \d+ bytes in a \d+-byte file"):
        engine.load_checkpoint(crafted)
    assert engine.load_checkpoint(plain)["model"].numel() == 16 << 20  # the same, stored as torch.save does
