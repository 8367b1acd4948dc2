"""train.precision: an explicit name mapped to autocast and a scaler (atric.precision), in the
run signature, trained and resumed under it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import fakes

from atric import engine
from atric.errors import CheckpointError, ConfigError
from atric.precision import Precision

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (AMP with fp16/bf16 on GPU)")




make_params = fakes.fake_params


def test_names_map_to_autocast_dtypes_and_a_scaler_only_for_fp16() -> None:
    cpu = torch.device("cpu")
    assert not Precision.create("fp32", cpu).enabled
    bf16 = Precision.create("bf16", cpu)
    assert bf16.enabled and bf16.dtype == torch.bfloat16 and bf16.scaler is None
    with bf16.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        Precision.create("fp16", cpu)


def test_precision_is_recorded_and_a_resume_under_another_is_refused(data_root: Path, tmp_path: Path) -> None:
    engine.train(make_params(data_root, tmp_path, epochs=1, precision="fp32"))
    saved = engine.load_checkpoint(tmp_path / "models" / "fa-netrvlad" / "last.pt")
    assert saved["signature"]["train.precision"] == "fp32"
    with pytest.raises(CheckpointError, match=r"train\.precision: checkpoint 'fp32', now 'bf16'"):
        engine.train(make_params(data_root, tmp_path, epochs=2, precision="bf16"))


@pytest.mark.parametrize("precision", ["bf16", pytest.param("fp16", marks=CUDA)])
def test_amp_train_and_resume_match_an_uninterrupted_run(data_root: Path, tmp_path: Path, precision: str) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if precision == "bf16" and device == "cuda" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    settings = {"epochs": 3, "precision": precision, "device": device, "pooling": "netvlad"}
    full = engine.train(make_params(data_root, tmp_path / "full", **settings))
    engine.train(make_params(data_root, tmp_path / "cut", **{**settings, "epochs": 2}))
    resumed = engine.train(make_params(data_root, tmp_path / "cut", **settings))
    assert resumed.resumed_from == 2 and resumed.history == full.history
    best = engine.load_checkpoint(full.paths.last)
    assert best["signature"]["train.precision"] == precision
    if precision == "fp16":
        assert best["scaler"]  # the GradScaler's state travels with last.pt


@pytest.mark.parametrize("pooling", ["mean", "max", "lstm", "netvlad", "netrvlad", "seqtransf"])
def test_every_pooling_runs_forward_and_backward_under_autocast(pooling: str) -> None:
    from atric.model import build_pooling

    torch.manual_seed(0)
    module = build_pooling(pooling, 6, clusters=3, ghost_clusters=1, lstm_hidden=5, transformer_width=8, transformer_heads=2)
    x = torch.randn(3, 7, 6, requires_grad=True)
    mask = torch.arange(7).unsqueeze(0) < torch.tensor([[7], [3], [5]])
    with Precision.create("bf16", torch.device("cpu")).autocast():
        out = module(x, mask)
    out.float().sum().backward()
    assert torch.isfinite(out.float()).all() and x.grad is not None
