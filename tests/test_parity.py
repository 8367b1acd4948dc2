"""atric's PANNs and VGGish against the official model code, with random weights in the official layout.

The official code ships without weights in ``panns-inference`` (PANNs Cnn14, from
audioset_tagging_cnn) and ``torchvggish`` 0.2 (harritaylor's VGGish port, whose weights
atric loads). Each test builds the official model, saves its state dict as the official
checkpoints are laid out, loads that file through atric's normal
``features.<expert>.checkpoint`` path, and compares outputs on the same waveform.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from atric.errors import CheckpointError
from atric.features import build_expert


def load_module_by_path(package_dir: Path, relative: str, alias: str) -> types.ModuleType:
    """Import ``package_dir/relative.py`` without running any package ``__init__``.

    ``panns_inference/__init__`` downloads a labels CSV and ``torch_vggish_yamnet``'s
    imports torchaudio; the model files need only their relative imports, so the
    packages above them are registered as empty namespaces under ``alias``.
    """
    parts = relative.split("/")
    for depth in range(len(parts)):
        name = ".".join([alias, *parts[:depth]])
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = [str(package_dir.joinpath(*parts[:depth]))]
            sys.modules[name] = package
    name = ".".join([alias, *parts])
    spec = importlib.util.spec_from_file_location(name, package_dir / f"{relative}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(f"{name} is not installed (a test dependency: make venv installs it)")
    return Path(next(iter(spec.submodule_search_locations)))


def randomise_batch_norms(model: torch.nn.Module) -> None:
    """Non-trivial statistics and affine terms, so a skipped buffer or parameter would show."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                shape = module.running_mean.shape
                module.running_mean.copy_(torch.rand(shape, generator=generator) - 0.5)
                module.running_var.copy_(0.5 + 1.5 * torch.rand(shape, generator=generator))
                module.weight.copy_(0.5 + torch.rand(shape, generator=generator))
                module.bias.copy_(0.2 * torch.randn(shape, generator=generator))


def waveform(seconds: float, sr: int, seed: int = 0) -> np.ndarray:
    """A chirp plus noise: energy across the mel range, so every band matters."""
    t = np.arange(int(seconds * sr)) / sr
    chirp = np.sin(2 * np.pi * (200 * t + 2000 * t**2))
    noise = np.random.default_rng(seed).standard_normal(t.size)
    return (0.3 * chirp + 0.05 * noise).astype(np.float32)


# ---------------------------------------------------------------- PANNs
@pytest.fixture(scope="module")
def official_cnn14(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    models = load_module_by_path(package_dir("panns_inference"), "models", "_official_panns")
    torch.manual_seed(0)
    model = models.Cnn14(
        sample_rate=32000, window_size=1024, hop_size=320, mel_bins=64, fmin=50, fmax=14000, classes_num=527
    )
    randomise_batch_norms(model)
    path = tmp_path_factory.mktemp("panns") / "Cnn14_mAP=0.431.pth"
    torch.save({"model": model.state_dict()}, path)  # the official checkpoint layout
    return model.eval(), path


def test_panns_cnn14_matches_official_code(official_cnn14) -> None:
    official, path = official_cnn14
    expert = build_expert("panns_cnn14", {"checkpoint": str(path)})
    wave = waveform(3.0, 32000)
    captured: dict[str, torch.Tensor] = {}
    # atric's frames come from the last conv block: hook it in the official model.
    hook = official.conv_block6.register_forward_hook(lambda m, i, out: captured.update(block6=out))
    try:
        with torch.inference_mode():
            out = official(torch.from_numpy(wave)[None])
    finally:
        hook.remove()
    x = captured["block6"].mean(dim=3)
    # The official decision-level models' 3-frame smoothing, which atric stores per frame.
    official_frames = (F.max_pool1d(x, 3, 1, 1) + F.avg_pool1d(x, 3, 1, 1)).transpose(1, 2)[0].numpy()
    ours = expert.embed([wave])[0]
    assert ours.shape == official_frames.shape == (9, 2048)
    frame_diff = float(np.abs(ours - official_frames).max())
    with torch.inference_mode():
        clip = expert.model.clip_embedding(torch.from_numpy(wave)[None])[0].numpy()
    clip_diff = float(np.abs(clip - out["embedding"][0].numpy()).max())
    print(f"panns_cnn14 parity: frames max abs diff {frame_diff:.2e}, clip embedding {clip_diff:.2e}")
    np.testing.assert_allclose(ours, official_frames, atol=1e-5, rtol=0)
    np.testing.assert_allclose(clip, out["embedding"][0].numpy(), atol=1e-5, rtol=0)
    assert np.abs(ours).max() > 1e-2  # not a trivially zero comparison


def test_panns_cnn10_follows_official_naming(official_cnn14) -> None:
    """No package ships the official Cnn10 code; its checkpoint is Cnn14's layout cut to four
    blocks with fc1 512 -> 512 (audioset_tagging_cnn models.py), and atric's Cnn10 is the same
    PannsCnn class (blocks, front end, heads) that the Cnn14 parity above proves."""
    from atric.features.panns import PannsCnn, PannsCnn10, PannsCnn14

    official, _ = official_cnn14
    shapes14 = {k: tuple(v.shape) for k, v in official.state_dict().items()}
    expected = {
        k: s
        for k, s in shapes14.items()
        if not k.startswith(("conv_block5.", "conv_block6.", "fc1.", "fc_audioset."))
    }
    expected |= {
        "fc1.weight": (512, 512),
        "fc1.bias": (512,),
        "fc_audioset.weight": (527, 512),
        "fc_audioset.bias": (527,),
    }
    with torch.device("meta"):
        cnn10 = PannsCnn(PannsCnn10.channels)
        cnn14 = PannsCnn(PannsCnn14.channels)
    assert {k: tuple(v.shape) for k, v in cnn10.state_dict().items()} == expected
    assert {k: tuple(v.shape) for k, v in cnn14.state_dict().items()} == shapes14
    assert type(cnn10.conv_block1) is type(cnn14.conv_block1)
    assert PannsCnn10.channels == PannsCnn14.channels[:4]
    assert cnn10.time_stride == 16  # pools after all four blocks: 0.16 s per frame


def test_panns_checkpoint_problems_are_named(tmp_path: Path, official_cnn14) -> None:
    _, path = official_cnn14
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[: 1 << 20])
    with pytest.raises(CheckpointError, match=f"{truncated}: not a readable torch checkpoint"):
        build_expert("panns_cnn14", {"checkpoint": str(truncated)})
    # The official CNN14 file given to CNN10: extra blocks and a wider fc1, first few listed.
    with pytest.raises(
        CheckpointError, match=r"unexpected: conv_block5.*wrong shape: fc1.weight \(file \(2048, 2048\)"
    ):
        build_expert("panns_cnn10", {"checkpoint": str(path)})


# ---------------------------------------------------------------- VGGish
def test_vggish_matches_torchvggish(tmp_path: Path) -> None:
    import torchvggish
    from torchvggish import torchvggish as reference

    torch.manual_seed(0)
    official = reference._vgg(postprocess=False).eval()  # vggish() would download the weights
    path = tmp_path / "vggish-10086976.pth"
    torch.save(official.state_dict(), path)  # torchvggish's release: a bare state dict
    expert = build_expert("vggish", {"checkpoint": str(path)})
    wave = waveform(3.5, 16000, seed=2)
    examples = torchvggish.waveform_to_examples(wave.astype(np.float64), 16000, return_tensor=True)
    patches = expert.patches(wave)
    assert patches.shape == tuple(examples.shape[::2][:1]) + (96, 64) == (3, 96, 64)
    front_diff = float(np.abs(patches - examples[:, 0].detach().numpy()).max())
    with torch.inference_mode():
        expected = official(examples.detach()).numpy()
    ours = expert.embed([wave])[0]
    diff = float(np.abs(ours - expected).max())
    print(f"vggish parity: log-mel patches max abs diff {front_diff:.2e}, embeddings {diff:.2e}")
    np.testing.assert_allclose(patches, examples[:, 0].detach().numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)
    assert np.abs(expected).max() > 1e-3
