"""The paper's protocol: padded lengths as durations, the original's clip batching (atric.data,
atric.engine, atric.losses)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import fakes

from atric import engine
from atric.data import DEFAULT_MAX_FRAMES, open_split, resolve_max_frames, truncation
from atric.errors import DataError
from atric.layout import Layout
from atric.losses import merge_caption_similarities

# atric's extractors' frame hops (s): logmel default and pipeline, aisfx, PANNs, VGGish, YAMNet.
HOPS = {"logmel": 0.1, "logmel_5fps": 0.2, "aisfx": 0.5573, "panns_cnn14": 0.32, "vggish": 0.96, "yamnet": 0.48}


def clip_frames(durations: list[float], hop: float) -> np.ndarray:
    return np.array([max(1, round(d / hop)) for d in durations])


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("expert", list(HOPS))
def test_clotho_clips_of_15_to_30_s_are_whole_at_every_frame_rate(expert: str) -> None:
    lengths = clip_frames([15.0, 21.5, 30.0], HOPS[expert])
    frames = resolve_max_frames("CLOTHO", [expert], {}, {expert: lengths}, hops={expert: HOPS[expert]})
    assert frames[expert] == math.ceil(30.0 / HOPS[expert] - 1e-9)
    assert truncation(lengths, frames[expert]).clips_cut == 0.0


@pytest.mark.parametrize("expert", list(HOPS))
def test_a_duration_means_the_same_audio_at_every_frame_rate(expert: str) -> None:
    lengths = clip_frames([15.0, 20.0, 30.0], HOPS[expert])
    frames = resolve_max_frames("CLOTHO", [expert], {}, {expert: lengths}, max_seconds=10.0, hops={expert: HOPS[expert]})
    assert abs(frames[expert] * HOPS[expert] - 10.0) < HOPS[expert]  # 10 s of audio, whatever the hop
    cut = truncation(lengths, frames[expert])
    assert cut.clips_cut == 1.0  # every clip is longer than 10 s
    expected = float(np.clip(lengths - frames[expert], 0, None).sum() / lengths.sum())
    assert cut.frames_dropped == pytest.approx(expected)
    assert 0.4 < cut.frames_dropped < 0.6


def test_audiocaps_default_holds_the_whole_10_s_clip_not_the_originals_frame_count() -> None:
    # The original's 10 logmel frames are 2 s at atric's pipeline hop (0.2 s): the old silent cut.
    lengths = clip_frames([10.0] * 4, 0.2)
    frames = resolve_max_frames("AudioCaps", ["logmel"], {}, {"logmel": lengths}, hops={"logmel": 0.2})
    assert frames["logmel"] == 50 and truncation(lengths, 50).clips_cut == 0.0


def test_files_without_a_frame_rate_keep_the_originals_frame_counts() -> None:
    lengths = np.array([80, 95, 120])
    frames = resolve_max_frames("CLOTHO", ["panns_cnn14"], {}, {"panns_cnn14": lengths}, hops={})
    assert frames["panns_cnn14"] == DEFAULT_MAX_FRAMES["CLOTHO"]["panns_cnn14"]


def test_explicit_frames_override_the_duration() -> None:
    lengths = np.array([100, 200])
    frames = resolve_max_frames("CLOTHO", ["logmel"], {"logmel": 64}, {"logmel": lengths}, max_seconds=10, hops={"logmel": 0.1})
    assert frames == {"logmel": 64}


@pytest.mark.parametrize(
    ("configured", "max_seconds", "message"),
    [
        ({"logmel": 7000}, None, r"train\.max_frames\.logmel=7000 frames \(params\.yaml or --set\) pads logmel clips to 700 s"),
        ({}, 3000.0, r"train\.max_seconds=3000 s \(params\.yaml or --set\) pads logmel clips to 3000 s, over 600 s: a unit mistake"),
        ({"logmel": 0}, None, r"train\.max_frames\.logmel: must be >= 1"),
    ],
)
def test_padded_lengths_that_are_unit_mistakes_are_refused(
    configured: dict[str, int], max_seconds: float | None, message: str
) -> None:
    with pytest.raises(DataError, match=message):
        resolve_max_frames("CLOTHO", ["logmel"], configured, {"logmel": np.array([150, 200])}, max_seconds=max_seconds, hops={"logmel": 0.1})


def test_a_length_far_beyond_every_clip_pads_and_says_how_much() -> None:
    """The real-corpus bug: the Clotho preset's 30 s on clips of 0.3-2.8 s (aisfx: 0.56 s a frame)."""
    lengths = np.array([1, 2, 5])
    frames = resolve_max_frames("CLOTHO", ["aisfx"], {}, {"aisfx": lengths}, max_seconds=30.0, hops={"aisfx": 0.56})
    assert frames == {"aisfx": 54}
    cut = truncation(lengths, frames["aisfx"])
    assert cut.clips_cut == 0 and cut.frames_dropped == 0
    assert cut.padding == pytest.approx(1 - 8 / (3 * 54))
    assert "95.1% of the padded length is padding" in cut.describe()


def test_frames_without_a_frame_rate_are_refused_only_far_beyond_every_clip() -> None:
    lengths = np.array([3, 4])
    assert resolve_max_frames("X", ["fa"], {"fa": 400}, {"fa": lengths}, hops={}) == {"fa": 400}
    with pytest.raises(DataError, match=r"train\.max_frames\.fa=401 frames .* over 100x the longest train clip of fa"):
        resolve_max_frames("X", ["fa"], {"fa": 401}, {"fa": lengths}, hops={})


def test_open_split_reads_the_hop_its_feature_file_records(tmp_path: Path) -> None:
    fakes.write_fake_layout(tmp_path / "data", experts={"fa": 4})
    layout = Layout(fakes.DATASET, tmp_path / "data")
    path = layout.features_path("fa", "train")
    import h5py

    with h5py.File(path, "a") as h5:  # as atric's extractors record it
        h5.attrs["hop_seconds"] = 0.5
    data = open_split(layout, "train", experts=["fa"], vectors=fakes.VECTORS, max_frames={}, max_seconds=3.0)
    try:
        assert data.max_frames == {"fa": 6}
        assert data.truncation["fa"].clips_cut == pytest.approx(float(np.mean(data.experts["fa"].lengths > 6)))
    finally:
        data.close()


# ---------------------------------------------------------------- clip batching
def test_caption_similarities_are_averaged_per_clip() -> None:
    sim = torch.tensor([[1.0, 0.0, 0.2], [0.5, 0.4, 0.0], [0.1, 0.9, 0.3], [0.0, 0.0, 0.6], [0.2, 0.2, 0.9]])
    caption_clip = torch.tensor([0, 0, 1, 2, 2])
    merged = merge_caption_similarities(sim, caption_clip)
    expected = torch.tensor([[0.75, 0.2, 0.1], [0.1, 0.9, 0.3], [0.1, 0.1, 0.75]])
    assert torch.allclose(merged, expected)




make_params = fakes.fake_params


def test_clip_sampling_is_one_step_per_batch_of_distinct_clips(data_root: Path) -> None:
    params = make_params(data_root, data_root, sampling="clip", batch_size=8)
    layout = Layout(fakes.DATASET, data_root / "data")
    data = open_split(layout, "train", experts=["fa"], vectors=fakes.VECTORS, max_frames={})
    try:
        loader, sampler = engine.train_loader(data, batch_size=8, seed=0, num_workers=0, device=torch.device("cpu"), sampling="clip")
        pairs, _ = engine.train_loader(data, batch_size=8, seed=0, num_workers=0, device=torch.device("cpu"), sampling="pairs")
        assert len(loader) == 24 // 8 and len(pairs) == (24 * 5) // 8  # 5x fewer steps, as the original
        sampler.set_epoch(1)
        seen: list[int] = []
        for batch in loader:
            clips = batch.clip_index.tolist()
            assert len(clips) == 8 == len(set(clips))  # distinct clips: none repeats in a batch
            assert batch.words.shape[0] == 8 * 5  # every caption of each clip
            assert torch.equal(torch.bincount(batch.caption_clip), torch.full((8,), 5))
            seen += clips
        assert sorted(seen) == list(range(24))  # one pass over the clips an epoch
    finally:
        data.close()
    assert params.train.sampling == "clip"


@pytest.mark.parametrize("loss", ["max_margin", "infonce"])
def test_clip_sampling_trains_and_resumes_exactly(data_root: Path, tmp_path: Path, loss: str) -> None:
    settings = {"epochs": 3, "sampling": "clip", "batch_size": 8, "loss": loss}
    full = engine.train(make_params(data_root, tmp_path / "full", **settings))
    assert all(np.isfinite(row["train_loss"]) for row in full.history)
    first = engine.train(make_params(data_root, tmp_path / "cut", **{**settings, "epochs": 2}))
    assert first.epochs_run == 2
    resumed = engine.train(make_params(data_root, tmp_path / "cut", **settings))
    assert resumed.resumed_from == 2 and resumed.history == full.history


def test_sampling_is_part_of_the_run_signature(data_root: Path, tmp_path: Path) -> None:
    engine.train(make_params(data_root, tmp_path, epochs=1, sampling="pairs"))
    from atric.errors import CheckpointError

    with pytest.raises(CheckpointError, match=r"train\.sampling: checkpoint 'pairs', now 'clip'"):
        engine.train(make_params(data_root, tmp_path, epochs=2, sampling="clip"))


# ---------------------------------------------------------------- the original's optimiser
def test_ranger_is_the_originals_its_first_steps_descend() -> None:
    """f(x) = x^2 from x = 1, lr 0.1: the original's Ranger gives 0.80, 0.62, 0.46, 0.32, 0.19
    (SGD-momentum warm-up, no gradient centralisation); pytorch_optimizer's defaults climb."""
    from atric.config import TrainParams
    from atric.factory import build_optimizer

    x = torch.nn.Parameter(torch.tensor([1.0]))
    model = torch.nn.Module()
    model.x = x
    optimizer = build_optimizer(TrainParams(optimizer="ranger", lr=0.1, weight_decay=0.0), model, torch.nn.Identity())
    values = []
    for _ in range(5):
        optimizer.zero_grad()
        (x**2).sum().backward()
        optimizer.step()
        values.append(x.item())
    assert values == pytest.approx([0.80, 0.621, 0.460, 0.319, 0.194], abs=2e-3)
    assert all(b < a for a, b in zip([1.0, *values], values, strict=False))


def test_noam_schedule_warms_up_to_lr_then_decays_per_step() -> None:
    from atric.config import TrainParams
    from atric.factory import build_optimizer, build_scheduler, scheduler_steps_per_batch

    train = TrainParams(optimizer="adamw", lr=0.01, scheduler="noam", warmup_steps=4)
    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(train, model, torch.nn.Identity())
    scheduler = build_scheduler(train, optimizer)
    assert scheduler_steps_per_batch(train) and not scheduler_steps_per_batch(TrainParams())
    lrs = []
    for _ in range(16):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[:4] == pytest.approx([0.005, 0.0075, 0.01, 0.01 * (4 / 5) ** 0.5])
    assert max(lrs) == pytest.approx(0.01) and lrs[-1] == pytest.approx(0.01 * (4 / 17) ** 0.5)


def test_seqtransf_with_noam_trains_and_resumes_exactly(data_root: Path, tmp_path: Path) -> None:
    settings = {"epochs": 3, "pooling": "seqtransf", "transformer_width": 8, "transformer_heads": 2,
                "scheduler": "noam", "warmup_steps": 5, "optimizer": "adamw"}
    full = engine.train(make_params(data_root, tmp_path / "full", **settings))
    assert [row["lr"] for row in full.history] != [full.history[0]["lr"]] * 3  # stepped per batch
    engine.train(make_params(data_root, tmp_path / "cut", **{**settings, "epochs": 1}))
    resumed = engine.train(make_params(data_root, tmp_path / "cut", **settings))
    assert resumed.resumed_from == 1 and resumed.history == full.history


@pytest.mark.parametrize(("pooling", "order_blind"), [("mean", True), ("lstm", False)])
def test_time_reversed_control_leaves_order_blind_poolings_unchanged(
    data_root: Path, tmp_path: Path, pooling: str, order_blind: bool
) -> None:
    from atric.embed import split_similarity

    result = engine.train(make_params(data_root, tmp_path, epochs=1, pooling=pooling))
    checkpoint = engine.load_checkpoint(result.paths.best)
    from atric.factory import model_from_checkpoint

    model = model_from_checkpoint(checkpoint)
    data = open_split(Layout(fakes.DATASET, data_root / "data"), "test", experts=["fa"], vectors=fakes.VECTORS,
                      padded_lengths=dict(checkpoint["max_frames"]))
    try:
        forward = split_similarity(model, data, device=torch.device("cpu"), batch_size=8)
        backward = split_similarity(model, data, device=torch.device("cpu"), batch_size=8, time_reversed=True)
    finally:
        data.close()
    assert np.allclose(forward, backward, atol=1e-5) == order_blind


def test_the_datasets_default_duration_is_not_refused_on_short_clips() -> None:
    # A user's CLOTHO subset of short clips: the 30 s default pads, it is not the user's typo.
    frames = resolve_max_frames("CLOTHO", ["logmel"], {}, {"logmel": np.array([5, 9])}, hops={"logmel": 0.1})
    assert frames == {"logmel": 300}
