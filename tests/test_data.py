"""Splits, feature checks, padding and collation (atric.data)."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
import fakes

from atric.data import (
    DEFAULT_MAX_FRAMES,
    LENGTH_PERCENTILE,
    BackgroundLoader,
    EpochSampler,
    TrainBatches,
    batch_as_is,
    open_split,
    pad_frames,
    split_batch,
)
from atric.errors import DataError
from atric.layout import Clip, Layout, write_index


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    return fakes.write_fake_layout(tmp_path_factory.mktemp("data"), clips={"train": 12, "val": 4, "test": 4})


def _open(layout: Layout, split: str = "train", **kw):
    kw.setdefault("max_frames", {})
    return open_split(layout, split, experts=["fa", "fb"], vectors=fakes.VECTORS, **kw)


def test_pad_frames_cuts_to_the_first_frames_and_pads_with_a_mask() -> None:
    long = np.arange(12, dtype=np.float32).reshape(6, 2)  # 6 frames, cut to 4
    short = np.ones((2, 2), dtype=np.float32)  # 2 frames, padded to 4
    x, mask = pad_frames([long, short], 4)
    assert x.shape == (2, 4, 2) and mask.dtype == torch.bool
    assert torch.equal(x[0], torch.from_numpy(long[:4]))
    assert torch.equal(x[1, :2], torch.ones(2, 2)) and torch.equal(x[1, 2:], torch.zeros(2, 2))
    assert mask.tolist() == [[True] * 4, [True, True, False, False]]


@pytest.mark.parametrize("cache", ["yes", "no"])
def test_a_batch_holds_each_clip_once_padded_and_cut(layout: Layout, cache: str) -> None:
    data = _open(layout, cache_in_ram=cache, max_frames={"fa": 4, "fb": 2})
    captions = np.array([35, 15, 36, 45])  # 5 captions per clip: clips 7, 3, 7 again, 9
    batch = split_batch(data, captions)
    assert batch.clip_index.tolist() == [7, 3, 9]
    assert batch.caption_clip.tolist() == [0, 1, 0, 2]
    for name, frames in (("fa", 4), ("fb", 2)):
        x, mask = batch.audio[name]
        assert x.shape == (3, frames, data.expert_dims[name])  # each expert has its own length
        for row, clip in enumerate((7, 3, 9)):
            real = min(int(data.experts[name].lengths[clip]), frames)
            assert mask[row].tolist() == [True] * real + [False] * (frames - real)
            reference = _h5py_frames(data.experts[name].path, data.clips[clip].clip_id, frames)
            assert x[row, :real].numpy().tobytes() == reference.tobytes()
            assert torch.all(x[row, real:] == 0)
    longest = max(data.words[c].shape[0] for c in captions)
    assert batch.words.shape == (4, longest, data.text_dim)  # padded to the longest caption of the batch
    assert batch.word_mask.sum(dim=1).tolist() == [data.words[c].shape[0] for c in captions]
    assert torch.equal(batch.words[1, : data.words[15].shape[0]], torch.from_numpy(data.words[15]))
    data.close()


def test_open_split_checks_and_resolves_padded_lengths(layout: Layout) -> None:
    data = _open(layout, max_frames={"fa": 5})
    assert data.expert_dims == {"fa": 8, "fb": 5} and data.text_dim == 6
    assert len(data.words) == 12 * 5 and data.caption_clip.tolist() == [i // 5 for i in range(60)]
    assert data.max_frames["fa"] == 5  # from params
    expected = int(np.ceil(np.percentile(data.experts["fb"].lengths, LENGTH_PERCENTILE)))
    assert data.max_frames["fb"] == expected  # unknown dataset: 95th percentile of train lengths
    assert data.experts["fa"].frames(1).shape[0] <= 5 and data.words[7].shape[1] == 6


def test_known_datasets_use_the_papers_lengths(tmp_path: Path) -> None:
    for dataset in ("CLOTHO", "AudioCaps"):  # AudioCaps also exercises the CSV index
        fake = fakes.write_fake_layout(tmp_path, clips={"train": 3}, experts={"vggish": 4}, dataset=dataset)
        data = open_split(fake, "train", experts=["vggish"], vectors=fakes.VECTORS, max_frames={})
        assert data.max_frames == {"vggish": DEFAULT_MAX_FRAMES[dataset]["vggish"]}
    assert DEFAULT_MAX_FRAMES["CLOTHO"]["efficientlatent"] > 0


def test_cached_and_streamed_features_are_identical(layout: Layout) -> None:
    cached = _open(layout, cache_in_ram="yes")
    streamed = _open(layout, cache_in_ram="no")
    assert cached.cached and not streamed.cached
    for clip in range(len(cached)):
        for name in ("fa", "fb"):
            np.testing.assert_array_equal(
                cached.experts[name].frames(clip), streamed.experts[name].frames(clip)
            )
    assert _open(layout).cached  # auto: tiny features are cached


class _RowsInWorker(torch.utils.data.Dataset):
    """Where a DataLoader worker builds a batch's audio rows: is the tensor in shared memory?"""

    def __init__(self, data) -> None:
        self.data = data

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> torch.Tensor:
        x, _ = self.data.experts["fa"].rows(np.array([0, 1]))
        return torch.tensor(x.is_shared())


def test_streaming_works_in_dataloader_workers(layout: Layout) -> None:
    from atric.engine import train_loader

    data = _open(layout, cache_in_ram="no")
    data.experts["fa"].frames(0)  # the parent holds an open handle before forking
    loader, sampler = train_loader(data, batch_size=8, seed=0, num_workers=2, device=torch.device("cpu"))
    sampler.set_epoch(1)
    batches = list(loader)
    assert len(batches) == 60 // 8
    first = split_batch(data, np.asarray(list(sampler)[:8]))
    assert torch.equal(batches[0].audio["fa"][0], first.audio["fa"][0])
    assert torch.equal(batches[-1].clip_index, split_batch(data, np.asarray(list(sampler)[48:56])).clip_index)
    # In a worker the rows are read into shared memory (nothing copied to hand them over), here not.
    assert not data.experts["fa"].rows(np.array([0, 1]))[0].is_shared()
    assert list(DataLoader(_RowsInWorker(data), batch_size=None, num_workers=1)) == [torch.tensor(True)]
    data.close()


def _h5py_frames(path: Path, clip_id: str, max_frames: int) -> np.ndarray:
    with h5py.File(path, "r") as h5:
        return np.asarray(h5[clip_id][:max_frames])


@pytest.mark.parametrize("max_frames", [5, 100])
def test_direct_reads_are_h5pys_values_bit_for_bit(layout: Layout, max_frames: int) -> None:
    data = _open(layout, cache_in_ram="no", max_frames={"fa": max_frames, "fb": max_frames})
    for name in ("fa", "fb"):
        expert = data.experts[name]
        assert expert.offsets is not None and (expert.offsets >= 0).all()  # atric's files: all direct
        for clip, clip_id in enumerate(expert.clip_ids):
            direct = expert.frames(clip)
            expected = _h5py_frames(expert.path, clip_id, max_frames)
            assert direct.dtype == np.float32 and direct.shape == expected.shape
            assert direct.tobytes() == expected.tobytes()
    data.close()


def test_datasets_hdf5_must_decode_are_read_by_h5py(tmp_path: Path) -> None:
    other = fakes.write_fake_layout(tmp_path, clips={"train": 4, "val": 2, "test": 2})
    path = other.features_path("fa", "train")
    with h5py.File(path, "a") as h5:
        chunked = np.asarray(h5["train_001"])
        del h5["train_001"]
        h5.create_dataset("train_001", data=chunked, chunks=(1, 8), compression="gzip")
        wide = np.asarray(h5["train_002"]).astype(np.float64)
        del h5["train_002"]
        h5.create_dataset("train_002", data=wide)
    data = _open(other, cache_in_ram="no")
    expert = data.experts["fa"]
    assert list(expert.offsets >= 0) == [True, False, False, True]
    np.testing.assert_array_equal(expert.frames(1), chunked)
    assert expert.frames(2).dtype == np.float32
    np.testing.assert_array_equal(expert.frames(2), wide.astype(np.float32))
    x, mask = expert.rows(np.array([2, 0, 1]))  # a batch mixing decoded and direct reads
    for row, clip in enumerate((2, 0, 1)):
        real = int(mask[row].sum())
        np.testing.assert_array_equal(x[row, :real].numpy(), expert.frames(clip))
        assert torch.all(x[row, real:] == 0)
    data.close()


def test_direct_reads_check_values_and_refuse_a_replaced_file(tmp_path: Path) -> None:
    other = fakes.write_fake_layout(tmp_path, clips={"train": 4, "val": 2, "test": 2})
    path = other.features_path("fa", "train")
    with h5py.File(path, "r+") as h5:
        h5["train_003"][0, 0] = np.nan
    data = _open(other, cache_in_ram="no")
    with pytest.raises(DataError, match=r"fa\.h5:train_003: features contain NaN"):
        data.experts["fa"].frames(3)
    with pytest.raises(DataError, match=r"fa\.h5:train_003: features contain NaN"):
        data.experts["fa"].rows(np.array([0, 3]))  # a batch names the clip too
    data.close()

    data = _open(other, cache_in_ram="no")
    fakes.write_fake_layout(tmp_path, clips={"train": 4, "val": 2, "test": 2}, seed=1)  # a new extraction
    with pytest.raises(DataError, match=r"fa\.h5: the file changed while its split was open"):
        data.experts["fa"].frames(0)
    data.close()


class _Recorded(TrainBatches):
    """TrainBatches that note the thread each batch was built in."""

    threads: list[str]

    def __getitem__(self, items):  # type: ignore[no-untyped-def]
        self.threads.append(threading.current_thread().name)
        return super().__getitem__(items)


def _background_and_plain(data, seed: int = 5):  # type: ignore[no-untyped-def]
    from torch.utils.data import BatchSampler

    dataset = _Recorded(data)
    dataset.threads = []
    sampler = EpochSampler(len(dataset), seed)
    common = {"batch_size": None, "sampler": BatchSampler(sampler, 8, drop_last=True), "collate_fn": batch_as_is}
    return dataset, sampler, BackgroundLoader(dataset, **common), DataLoader(dataset, **common)


@pytest.mark.parametrize("cache", ["yes", "no"])
def test_background_loader_builds_the_same_batches_in_another_thread(layout: Layout, cache: str) -> None:
    data = _open(layout, cache_in_ram=cache)
    dataset, sampler, background, plain = _background_and_plain(data)
    sampler.set_epoch(2)
    expected = list(plain)
    assert set(dataset.threads) == {threading.current_thread().name}
    dataset.threads.clear()
    got = list(background)
    assert len(got) == len(expected) == len(background) == 60 // 8
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a.audio["fa"][0], b.audio["fa"][0]) and torch.equal(a.words, b.words)
        assert torch.equal(a.clip_index, b.clip_index) and torch.equal(a.caption_clip, b.caption_clip)
    assert set(dataset.threads) == {"atric-batches"}
    data.close()


def test_background_loader_raises_the_threads_error_and_stops_when_left(tmp_path: Path) -> None:
    other = fakes.write_fake_layout(tmp_path, clips={"train": 12, "val": 2, "test": 2})
    with h5py.File(other.features_path("fa", "train"), "r+") as h5:
        h5["train_007"][1, 0] = np.inf
    data = _open(other, cache_in_ram="no")
    _, sampler, background, _ = _background_and_plain(data)
    sampler.set_epoch(1)
    with pytest.raises(DataError, match=r"fa\.h5:train_007: features contain"):
        list(background)  # clip 7 is in one of the epoch's batches
    assert not [t for t in threading.enumerate() if t.name == "atric-batches"]
    # A consumer that stops early (a max_steps, an error in its step) stops the thread with it.
    with h5py.File(other.features_path("fa", "train"), "r+") as h5:
        h5["train_007"][1, 0] = 0.0
    data = _open(other, cache_in_ram="no")
    _, sampler, background, _ = _background_and_plain(data)
    batches = iter(background)
    next(batches)
    assert [t for t in threading.enumerate() if t.name == "atric-batches"]
    batches.close()  # what `del iterator` in train_epoch does
    assert not [t for t in threading.enumerate() if t.name == "atric-batches"]
    data.close()


def test_wrong_feature_dim_names_file_and_clip(tmp_path: Path) -> None:
    bad = fakes.write_fake_layout(tmp_path, clips={"train": 4})
    path = bad.features_path("fa", "train")
    with h5py.File(path, "a") as h5:
        del h5["train_002"]
        h5.create_dataset("train_002", data=np.zeros((3, 9), np.float32))
        del h5.attrs["dim"]  # dim then comes from the first clip
    with pytest.raises(DataError, match=r"fa\.h5.*'train_002'.*dim 9, expected 8"):
        _open(bad)


def test_dim_different_from_the_models_is_refused(layout: Layout) -> None:
    with pytest.raises(DataError, match=r"fa\.h5: feature dim is 8.*expects 16"):
        _open(layout, expert_dims={"fa": 16, "fb": 5})


def test_missing_features_and_empty_split_are_data_errors(tmp_path: Path) -> None:
    bad = fakes.write_fake_layout(tmp_path, clips={"train": 4, "val": 2})
    with h5py.File(bad.features_path("fb", "train"), "a") as h5:
        del h5["train_001"]
    with pytest.raises(DataError, match=r"fb\.h5: 1 clip\(s\) of the index have no features.*'train_001'"):
        _open(bad)
    write_index(bad.index_path("val"), [])
    with pytest.raises(DataError, match="val split has no clips"):
        _open(bad, "val")


def test_caption_count_mismatch_with_text_embeddings(tmp_path: Path) -> None:
    bad = fakes.write_fake_layout(tmp_path, clips={"train": 3})
    write_index(bad.index_path("train"), [Clip(f"train_{i:03d}", ("one", "two")) for i in range(3)])
    with pytest.raises(DataError, match="5 caption embeddings but 2 captions"):
        _open(bad)


def test_epoch_sampler_depends_only_on_seed_and_epoch() -> None:
    sampler = EpochSampler(50, seed=3)
    sampler.set_epoch(2)
    order = list(sampler)
    assert sorted(order) == list(range(50))
    again = EpochSampler(50, seed=3)
    again.set_epoch(1)
    list(again)  # consuming an earlier epoch changes nothing
    again.set_epoch(2)
    assert list(again) == order
    sampler.set_epoch(3)
    assert list(sampler) != order


@pytest.mark.parametrize("sampling", ["pairs", "clip"])
def test_cached_batches_are_the_dataloaders_batches(layout: Layout, sampling: str) -> None:
    """A split cached in RAM gives the batches the same split streamed from its files gives, padding cut included."""
    from atric.engine import train_loader

    lengths = {"fa": 3, "fb": 5}  # shorter than some clips: the cut must match too
    cached = _open(layout, cache_in_ram="yes", max_frames=lengths)
    streamed = _open(layout, cache_in_ram="no", max_frames=lengths)
    common = {"batch_size": 7 if sampling == "pairs" else 3, "seed": 3, "num_workers": 0, "device": torch.device("cpu"), "sampling": sampling}
    fast, fast_sampler = train_loader(cached, **common)
    slow, slow_sampler = train_loader(streamed, **common)
    assert isinstance(fast.dataset, TrainBatches) and isinstance(slow.dataset, TrainBatches)
    assert len(fast) == len(slow) > 1
    for epoch in (1, 2):
        fast_sampler.set_epoch(epoch)
        slow_sampler.set_epoch(epoch)
        pairs = list(zip(fast, slow, strict=True))
        for a, b in pairs:
            for name in ("fa", "fb"):
                assert torch.equal(a.audio[name][0], b.audio[name][0])
                assert torch.equal(a.audio[name][1], b.audio[name][1])
            assert torch.equal(a.words, b.words) and torch.equal(a.word_mask, b.word_mask)
            assert torch.equal(a.caption_clip, b.caption_clip) and torch.equal(a.clip_index, b.clip_index)
        assert pairs[0][0].clip_index.dtype == torch.long and pairs[0][0].caption_clip.dtype == torch.long


def test_cached_clip_batches_are_the_clip_loaders(layout: Layout) -> None:
    """Evaluation's batches of a cached split are sliced from the cache: the same tensors."""
    from atric.embed import _cached_clip_batches, clip_loader

    lengths = {"fa": 3, "fb": 5}
    cached = _open(layout, cache_in_ram="yes", max_frames=lengths)
    streamed = _open(layout, cache_in_ram="no", max_frames=lengths)
    fast = list(_cached_clip_batches(cached, 5))
    slow = list(clip_loader(streamed, batch_size=5, device=torch.device("cpu")))
    assert len(fast) == len(slow) == 3  # 12 clips: 5, 5, 2
    for a, b in zip(fast, slow, strict=True):
        for name in ("fa", "fb"):
            assert torch.equal(a[name][0], b[name][0]) and torch.equal(a[name][1], b[name][1])
