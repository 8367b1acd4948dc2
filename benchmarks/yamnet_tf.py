"""atric's torch YAMNet against TensorFlow's own YAMNet model on the same audio (a one-off check).

    python3.11 -m venv /tmp/tfvenv && /tmp/tfvenv/bin/pip install tensorflow-cpu soundfile
    .venv/bin/python benchmarks/yamnet_tf.py --tf-python /tmp/tfvenv/bin/python

TensorFlow never enters .venv or pyproject: this script runs itself a second time under
``--tf-python`` (a throwaway venv) in ``--tf-worker`` mode, which loads the wheel's
SavedModel (the TF Hub YAMNet inside it: waveform -> scores, embeddings, log-mel) and
writes its outputs to an .npz. Prints JSON: max abs differences of embeddings, scores and
log-mel spectrograms on the wheel's 60 s recording and on short synthetic clips (one
shorter than YAMNet's 0.975 s minimum, to check the padding), plus the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def tf_worker(model_dir: str, inputs: str, outputs: str) -> None:
    """Runs under the TensorFlow venv: no atric, no torch."""
    import numpy as np
    import tensorflow as tf

    saved = tf.saved_model.load(model_dir)
    yamnet = getattr(saved, "layer-1").layer._func  # the hub.KerasLayer's YAMNet module
    results = {}
    with np.load(inputs) as data:
        for name in data.files:
            scores, embeddings, spectrogram = yamnet(tf.constant(data[name], tf.float32))
            results[f"{name}/scores"] = scores.numpy()
            results[f"{name}/embeddings"] = embeddings.numpy()
            results[f"{name}/log_mel"] = spectrogram.numpy()
    np.savez(outputs, **results)


def compare(tf_python: str) -> dict:
    import numpy as np
    import soundfile as sf
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from atric.features.vggish import log_mel
    from atric.features.yamnet import LOG_OFFSET, Yamnet, pad_waveform, wheel_files

    files = wheel_files()
    wave, rate = sf.read(files["test_wav"], dtype="float32")
    assert rate == 16000
    t = np.arange(16000 * 3) / 16000
    clips = {
        "mini_test_60s": wave,
        # A pure tone leaves bins far from it near zero, where float32 FFT round-off (in TF,
        # not in our float64 FFT) is magnified by log(mel + 0.001): expect a larger difference.
        "tone_0.3s": (0.3 * np.sin(2 * np.pi * 880 * t[:4800])).astype(np.float32),
        "noise_0.5s": (0.1 * np.random.default_rng(1).standard_normal(8000)).astype(np.float32),
        "noise_tone_2.2s": (0.2 * np.sin(2 * np.pi * 440 * t[:35200])
                            + 0.05 * np.random.default_rng(0).standard_normal(35200)).astype(np.float32),
    }  # fmt: skip
    expert = Yamnet({}, torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        inputs, outputs = Path(tmp) / "in.npz", Path(tmp) / "out.npz"
        np.savez(inputs, **clips)
        model_dir = files["checkpoint"].parents[1]
        subprocess.run(
            [tf_python, __file__, "--tf-worker", str(model_dir), str(inputs), str(outputs)],
            check=True,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        )
        reference = dict(np.load(outputs))
    report: dict = {}
    for name, clip in clips.items():
        ours_emb = expert.embed([clip])[0]
        ours_scores = expert.scores(clip)
        ours_mel = log_mel(pad_waveform(clip, expert.patch_hop * 160), expert._mel, LOG_OFFSET)
        theirs = {k: reference[f"{name}/{k}"] for k in ("embeddings", "scores", "log_mel")}
        assert ours_emb.shape == theirs["embeddings"].shape, (
            name,
            ours_emb.shape,
            theirs["embeddings"].shape,
        )
        report[name] = {
            "seconds": round(clip.size / 16000, 3),
            "patches": int(ours_emb.shape[0]),
            "embeddings_max_abs_diff": float(np.abs(ours_emb - theirs["embeddings"]).max()),
            "embeddings_max_abs_value": float(np.abs(theirs["embeddings"]).max()),
            "scores_max_abs_diff": float(np.abs(ours_scores - theirs["scores"]).max()),
            "log_mel_max_abs_diff": float(np.abs(ours_mel - theirs["log_mel"]).max()),
            "top_class_agrees": bool(ours_scores.mean(0).argmax() == theirs["scores"].mean(0).argmax()),
        }
    worst = max(r["embeddings_max_abs_diff"] for r in report.values())
    return {
        "clips": report,
        "embeddings_max_abs_diff": worst,
        "all_below_1e-4": worst < 1e-4,
        "load_average_1min": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tf-python", default="/tmp/tfvenv/bin/python", help="python of a venv with TensorFlow"
    )
    parser.add_argument("--tf-worker", nargs=3, metavar=("MODEL_DIR", "IN", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tf_worker:
        tf_worker(*args.tf_worker)
        return
    if not Path(args.tf_python).exists():
        sys.exit(f"{args.tf_python}: no such python; create a TensorFlow venv first (see this script's doc)")
    print(json.dumps(compare(args.tf_python), indent=2))


if __name__ == "__main__":
    main()
