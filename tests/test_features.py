"""Audio experts: shapes, registry errors, checkpoint loading, and that aisfx is the pretrained net."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from atric.errors import CheckpointError, ConfigError
from atric.features import EXPERTS, build_expert
from atric.features.base import sha256_file

SR16 = 16000


def noise(seconds: float, sr: int, seed: int = 0) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * sr))).astype(np.float32)


# ---------------------------------------------------------------- event generators (for aisfx)
def harmonic_tone(f0: float, sr: int = 44100, seconds: float = 3.0) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    y = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 6))
    return (0.3 * y / np.max(np.abs(y))).astype(np.float32)


def noise_burst(seed: int, sr: int = 44100, seconds: float = 3.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y = rng.standard_normal(int(sr * seconds))
    envelope = np.exp(-np.arange(y.size) / (0.8 * sr))
    return (0.3 * y * envelope).astype(np.float32)


def bark_train(rate_hz: float, f0: float, sr: int = 44100, seconds: float = 3.0) -> np.ndarray:
    """Short, loud, pitched-and-noisy pulses: a bark-like train."""
    t = np.arange(int(sr * seconds)) / sr
    rng = np.random.default_rng(int(f0))
    phase = (t * rate_hz) % 1.0
    pulse = np.exp(-phase / 0.04) * (phase < 0.25)
    carrier = np.sign(np.sin(2 * np.pi * f0 * t)) + 0.5 * rng.standard_normal(t.size)
    return (0.3 * pulse * carrier).astype(np.float32)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ---------------------------------------------------------------- registry
def test_registry_lists_all_experts() -> None:
    assert set(EXPERTS) == {"logmel", "aisfx", "yamnet", "panns_cnn10", "panns_cnn14", "vggish"}


def test_unknown_expert_lists_valid_ones() -> None:
    with pytest.raises(ConfigError, match="unknown audio expert 'mfcc'.*logmel, aisfx"):
        build_expert("mfcc", {})


def test_unknown_setting_lists_valid_ones() -> None:
    with pytest.raises(ConfigError) as err:
        build_expert("logmel", {"n_mel": 64})
    assert "features.logmel" in str(err.value) and "n_mel" in str(err.value)
    assert "valid settings are: sample_rate, n_mels, hop_seconds" in str(err.value)


def test_bad_setting_value_names_key() -> None:
    with pytest.raises(ConfigError, match="hop_seconds"):
        build_expert("logmel", {"hop_seconds": -1})
    with pytest.raises(ConfigError, match="multiple of 8"):
        build_expert("aisfx", {"block_step_frames": 25})


# ---------------------------------------------------------------- logmel
def test_logmel_shapes_and_rate() -> None:
    expert = build_expert("logmel", {})
    assert (expert.dim, expert.sample_rate, expert.hop_seconds) == (128, SR16, 0.1)
    short, one, three = expert.embed([np.zeros(5, np.float32), noise(1.0, SR16), noise(3.0, SR16, 1)])
    for out in (short, one, three):
        assert out.dtype == np.float32 and out.ndim == 2 and out.shape[1] == 128
    assert short.shape[0] >= 1
    assert one.shape[0] == 11 and three.shape[0] == 31  # centred frames: 1 + samples // hop
    assert build_expert("logmel", {"n_mels": 40, "hop_seconds": 0.05}).embed([noise(1.0, SR16)])[0].shape == (
        21,
        40,
    )


def test_logmel_keeps_loudness() -> None:
    expert = build_expert("logmel", {})
    quiet, loud = expert.embed([noise(1.0, SR16), 10 * noise(1.0, SR16)])
    np.testing.assert_allclose(loud.mean() - quiet.mean(), 20.0, atol=0.5)  # +20 dB


# ---------------------------------------------------------------- aisfx (the real pretrained weights)
@pytest.fixture(scope="module")
def aisfx_shared():
    return build_expert("aisfx", {})


@pytest.fixture(scope="module")
def aisfx_blocks():
    return build_expert("aisfx", {"mode": "blocks"})


def test_aisfx_shapes(aisfx_shared, aisfx_blocks) -> None:
    assert aisfx_shared.dim == 512 and aisfx_shared.sample_rate == 44100
    assert aisfx_shared.hop_seconds == pytest.approx(24 * 1024 / 44100)
    waves = [np.zeros(10, np.float32), noise(1.0, 44100), noise(4.0, 44100, 1)]
    for expert in (aisfx_shared, aisfx_blocks):
        tiny, one, four = expert.embed(waves)
        assert tiny.shape == (1, 512) and one.shape == (1, 512)  # shorter than a block: padded
        assert four.shape == (1 + int(np.ceil((1 + 4 * 44100 // 1024 - 100) / 24)), 512) == (5, 512)
        assert all(np.isfinite(o).all() and o.dtype == np.float32 for o in (tiny, one, four))


def test_aisfx_loads_the_package_checkpoint(aisfx_shared) -> None:
    import aisfx.inference

    path = Path(aisfx.inference.get_path_modelWeights())
    assert aisfx_shared.checkpoint_hash == sha256_file(path)
    from atric.features.aisfx import _numpy_safe_globals
    from atric.features.base import load_torch_file

    weights, _ = load_torch_file(path, _numpy_safe_globals())
    ours = aisfx_shared.model.state_dict()
    for key, value in ours.items():
        torch.testing.assert_close(value, weights[f"embedding_net.{key}"], rtol=0, atol=0)


def test_aisfx_blocks_match_the_package_pipeline(tmp_path: Path, aisfx_blocks, aisfx_shared) -> None:
    """Our blocks mode equals aisfx's own librosa spectrogram + blocking + model, bit for bit-ish."""
    from aisfx.inference import load_bestModel, model_get_embedding
    from aisfx.spectrogram.spectrogram_librosa import compute_spectrogram

    from atric.audio import load_audio
    from atric.features.aisfx import _numpy_safe_globals
    from atric.features.base import load_torch_file

    wav = tmp_path / "mix.wav"
    sf.write(wav, np.concatenate([harmonic_tone(330.0), noise_burst(1)]), 44100, subtype="FLOAT")
    weights, ds_dict = load_torch_file(
        Path(__import__("aisfx").inference.get_path_modelWeights()), _numpy_safe_globals()
    )
    model = load_bestModel(weights, ds_dict, "cpu")
    spec = compute_spectrogram(str(wav), 44100, 2048, 1024, 96, 0.0, 22050.0) / 9.457798957824707
    reference = model_get_embedding(spec.T, 0.24, False, model, "cpu").numpy()  # (mels, time) -> (time, mels)

    waveform = load_audio(wav, 44100)
    ours = aisfx_blocks.embed([waveform])[0]
    assert ours.shape == reference.shape
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4)
    shared = aisfx_shared.embed([waveform])[0]
    assert shared.shape == ours.shape
    agreement = [cosine(a, b) for a, b in zip(shared, ours, strict=True)]
    assert min(agreement) > 0.85


def test_aisfx_separates_event_types(aisfx_shared) -> None:
    sounds = {
        "tone": [harmonic_tone(220.0), harmonic_tone(370.0)],
        "noise": [noise_burst(1), noise_burst(2)],
        "bark": [bark_train(3.0, 400.0), bark_train(4.0, 550.0)],
    }
    embeddings = {kind: [e.mean(axis=0) for e in aisfx_shared.embed(waves)] for kind, waves in sounds.items()}
    kinds = list(embeddings)
    for i, a in enumerate(kinds):
        within = cosine(*embeddings[a])
        for b in kinds[i + 1 :]:
            between = max(cosine(x, y) for x in embeddings[a] for y in embeddings[b])
            # Pretrained margins are 0.16-0.29; a randomly initialised net gives about 0.02.
            assert within > between + 0.1, (a, b, within, between)


def _package_conv_stack(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """aisfx's EmbeddingNet.forward before its max over time, through the package's own modules."""
    x = x.unsqueeze(1)
    for block, pool in (
        (net.conv_block1, (2, 2)),
        (net.conv_block2, (2, 2)),
        (net.conv_block3, (2, 2)),
        (net.conv_block4, (1, 1)),
    ):
        x = block(x, pool_size=pool, pool_type=net.pool_type)
    return x.mean(dim=3)


def test_aisfx_inference_stack_matches_the_package_modules(aisfx_shared, monkeypatch) -> None:
    """Batch norms folded, oneDNN's blocked layout: the package's numbers up to float32 rounding, and a
    clip's output independent of its batch and of the thread count, bit for bit."""
    from atric.features.aisfx import _InferenceConvStack

    net = aisfx_shared.model
    x = torch.rand(3, 124, 96, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        reference = _package_conv_stack(net, x)
        fast = aisfx_shared._conv_stack(x)
        assert fast.shape == reference.shape == (3, 512, 124 // 8)
        assert float((fast - reference).abs().max()) <= 1e-5 * float(reference.abs().max())
        for row in range(3):  # the same numbers alone as in a batch (lengths where channels-last fails)
            assert torch.equal(aisfx_shared._conv_stack(x[row : row + 1])[0], fast[row])
        threads = torch.get_num_threads()
        try:
            for count in (1, 3):
                torch.set_num_threads(count)
                assert torch.equal(aisfx_shared._conv_stack(x), fast), count
        finally:
            torch.set_num_threads(threads)
        monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)  # torch's own kernels (no oneDNN)
        plain = _InferenceConvStack(net, torch.device("cpu"))(x)
        monkeypatch.undo()
        assert float((plain - reference).abs().max()) <= 1e-5 * float(reference.abs().max())


def test_mel_projection_is_the_exact_product_rounded_once() -> None:
    import librosa

    from atric.features.base import MelProjection

    basis = librosa.filters.mel(sr=16000, n_fft=1024, n_mels=40)
    power = (np.random.default_rng(0).random((513, 37)) ** 4).astype(np.float32)
    mel = MelProjection(basis)(np.asfortranarray(power))  # librosa's STFTs are Fortran-ordered
    exact = basis.astype(np.float32).astype(np.float64) @ power.astype(np.float64)
    assert mel.dtype == np.float32 and mel.shape == (40, 37)
    np.testing.assert_array_equal(mel, exact.astype(np.float32))
    with pytest.raises(ValueError, match="513"):
        MelProjection(basis)(power.T)


def test_features_do_not_depend_on_the_thread_count(aisfx_shared) -> None:
    """Feature files are DVC outputs: the same on a 1-core and a many-core machine."""
    import threadpoolctl  # installed with librosa (through scikit-learn): never skipped

    logmel = build_expert("logmel", {})
    waves16 = [noise(1.3, SR16), noise(0.4, SR16, 1)]
    waves44 = [noise_burst(3), harmonic_tone(440.0, seconds=2.5)]
    expected = logmel.embed(waves16) + aisfx_shared.embed(waves44)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with threadpoolctl.threadpool_limits(1):
            single = logmel.embed(waves16) + aisfx_shared.embed(waves44)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(single, expected, strict=True):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- PANNs and VGGish (weights saved by the tests)
def _architecture(name: str) -> torch.nn.Module:
    from atric.features.panns import PannsCnn
    from atric.features.vggish import VGGishNet

    return {
        "panns_cnn10": lambda: PannsCnn((64, 128, 256, 512)),
        "panns_cnn14": lambda: PannsCnn((64, 128, 256, 512, 1024, 2048)),
        "vggish": VGGishNet,
    }[name]()


def _random_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = _architecture(name)
    # Non-trivial batch-norm statistics, so a load that skipped buffers would show.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, torch.nn.Module]]:
    root = tmp_path_factory.mktemp("ckpt")
    saved = {}
    for name in ("panns_cnn10", "vggish"):
        model = _random_model(name)
        path = root / f"{name}.pth"
        # PANNs' official files nest the state_dict under "model"; torchvggish's are bare.
        torch.save({"model": model.state_dict()} if name.startswith("panns") else model.state_dict(), path)
        saved[name] = (path, model)
    return saved


def test_panns_cnn10_round_trip(checkpoints) -> None:
    path, model = checkpoints["panns_cnn10"]
    expert = build_expert("panns_cnn10", {"checkpoint": str(path)})
    assert (expert.dim, expert.sample_rate, expert.hop_seconds) == (512, 32000, 0.16)
    assert expert.checkpoint_hash == sha256_file(path)
    waves = [noise(1.0, 32000), noise(3.0, 32000, 1), np.zeros(7, np.float32)]
    one, three, tiny = expert.embed(waves)
    assert (
        one.shape == (6, 512) and three.shape == (18, 512) and tiny.shape == (1, 512)
    )  # (1 + n // 320) // 16
    with torch.inference_mode():
        expected = model.frames(torch.from_numpy(waves[1])[None])[0].numpy()
    np.testing.assert_allclose(three, expected, rtol=1e-5, atol=1e-5)


def test_panns_cnn14_shapes(tmp_path: Path) -> None:
    from atric.features.panns import PannsCnn14

    # A bare fp16 state_dict (accepted, cast to float32); values are cheap constants, since
    # 80M random parameters would cost seconds and only shapes are checked here.
    with torch.device("meta"):
        shapes = _architecture("panns_cnn14").state_dict()
    state = {
        k: (torch.ones if "running_var" in k else torch.zeros)(v.shape, dtype=torch.float16)
        for k, v in shapes.items()
    }
    state = {k: (v.long() if "num_batches" in k else v) for k, v in state.items()}
    path = tmp_path / "cnn14.pth"
    torch.save(state, path)
    expert = build_expert("panns_cnn14", {"checkpoint": str(path)})
    assert isinstance(expert, PannsCnn14) and expert.dim == 2048 and expert.hop_seconds == 0.32
    assert next(expert.model.parameters()).dtype == torch.float32
    short, two = expert.embed([np.zeros(100, np.float32), noise(2.0, 32000)])
    assert short.shape == (1, 2048) and two.shape == (6, 2048)  # (1 + 64000 // 320) // 32


def test_vggish_round_trip_and_patches(checkpoints) -> None:
    path, model = checkpoints["vggish"]
    expert = build_expert("vggish", {"checkpoint": str(path)})
    assert (expert.dim, expert.sample_rate, expert.hop_seconds) == (128, SR16, 0.96)
    waves = [np.zeros(10, np.float32), noise(1.0, SR16), noise(3.0, SR16, 1)]
    tiny, one, three = expert.embed(waves)
    assert tiny.shape == (1, 128) and one.shape == (1, 128) and three.shape == (3, 128)
    with torch.inference_mode():
        expected = model(torch.from_numpy(expert.patches(waves[2]))).numpy()
    np.testing.assert_allclose(three, expected, rtol=1e-5, atol=1e-5)
    overlapping = build_expert("vggish", {"checkpoint": str(path), "patch_hop_seconds": 0.48})
    assert overlapping.embed([waves[2]])[0].shape == (5, 128)


def test_vggish_front_end() -> None:
    from atric.features.vggish import log_mel, mel_matrix

    mel = mel_matrix()
    assert mel.shape == (257, 64) and not mel[0].any() and (mel.sum(axis=0) > 0).all()
    tone = np.sin(2 * np.pi * 1000 * np.arange(SR16) / SR16).astype(np.float32)
    spec = log_mel(tone, mel)
    assert spec.shape == (1 + (SR16 - 400) // 160, 64)
    centre = 1127 * np.log(1 + 1000 / 700)
    edges = np.linspace(1127 * np.log(1 + 125 / 700), 1127 * np.log(1 + 7500 / 700), 66)[1:-1]
    assert abs(int(spec.mean(axis=0).argmax()) - int(np.abs(edges - centre).argmin())) <= 1


def test_missing_checkpoint(tmp_path: Path) -> None:
    missing = tmp_path / "Cnn10.pth"
    with pytest.raises(CheckpointError, match=f"{missing}.*zenodo"):
        build_expert("panns_cnn10", {"checkpoint": str(missing)})
    with pytest.raises(CheckpointError, match="torchvggish"):
        build_expert("vggish", {"checkpoint": str(missing)})
    with pytest.raises(ConfigError, match="features.vggish.checkpoint: required"):
        build_expert("vggish", {})


def test_mismatched_checkpoint(tmp_path: Path, checkpoints) -> None:
    path, model = checkpoints["panns_cnn10"]
    state = dict(model.state_dict())
    del state["conv_block1.conv1.weight"]
    state["head.weight"] = torch.zeros(3)
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(CheckpointError) as err:
        build_expert("panns_cnn10", {"checkpoint": str(bad)})
    assert "1 missing: conv_block1.conv1.weight" in str(err.value)
    assert "1 unexpected: head.weight" in str(err.value)
    # CNN10 weights given to CNN14: wrong shapes and missing blocks, first few listed.
    with pytest.raises(
        CheckpointError, match=r"missing: conv_block5.*wrong shape: fc1.weight \(file \(512, 512\)"
    ):
        build_expert("panns_cnn14", {"checkpoint": str(path)})


class _Malicious:
    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = _Malicious()
    payload.marker = str(marker)
    evil = tmp_path / "evil.pth"
    torch.save({"model": payload}, evil)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match=f"{evil}: refused to load"):
        build_expert("panns_cnn10", {"checkpoint": str(evil)})
    assert not marker.exists()
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=str(garbage)):
        build_expert("vggish", {"checkpoint": str(garbage)})
