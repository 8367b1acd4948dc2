"""Example figure of the synthetic corpus: log-mel spectrograms with event boxes and a caption."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from atric.atomic import atomic_path
from atric.audio import load_audio
from atric.corpus.synth import read_synth_raw
from atric.errors import DataError


def plot_corpus_examples(
    raw_dir: str | Path,
    out_path: str | Path,
    count: int = 6,
    split: str = "train",
    clip_ids: Sequence[str] | None = None,
) -> Path:
    """Draw the first ``count`` clips of ``split`` (or the given clip ids).

    By default that shows pairs: clips 2k and 2k+1 share event types in different orders.
    """
    import librosa
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    manifest = read_synth_raw(raw_dir)
    if clip_ids is None:
        clips = manifest.split(split)[:count]
    else:
        by_id = {clip.clip_id: clip for clip in manifest.clips}
        missing = [c for c in clip_ids if c not in by_id]
        if missing:
            raise DataError(f"{raw_dir}: no clip(s) {', '.join(missing)} in the corpus")
        clips = [by_id[c] for c in clip_ids]
    sr = manifest.sample_rate
    fig, axes = plt.subplots(len(clips), 1, figsize=(11, 2.6 * len(clips)), squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, clip in zip(axes[:, 0], clips, strict=True):
        audio = load_audio(manifest.audio_path(clip), sr, clip.clip_id)
        hop = 160 * sr // 16000
        mel = librosa.feature.melspectrogram(y=audio, sr=sr, n_fft=4 * hop, hop_length=hop, n_mels=64)
        log_mel = librosa.power_to_db(mel, ref=np.max, top_db=80)
        ax.imshow(
            log_mel,
            origin="lower",
            aspect="auto",
            cmap="magma",
            extent=(0, audio.size / sr, 0, log_mel.shape[0]),
        )
        for k, event in enumerate(clip.extra.get("events", [])):
            colour = colours(k % 10)
            ax.add_patch(
                Rectangle(
                    (event["onset"], 1),
                    event["duration"],
                    log_mel.shape[0] - 2,
                    fill=False,
                    edgecolor=colour,
                    linewidth=1.8,
                )
            )
            label = event["type"] + (f" ({event['modifier']})" if event.get("modifier") else "")
            ax.text(
                event["onset"] + 0.03,
                log_mel.shape[0] - 6 - 9 * k,
                label,
                color=colour,
                fontsize=8,
                bbox={"facecolor": "black", "alpha": 0.6, "pad": 1, "edgecolor": "none"},
            )
        ax.set_title(
            f"{clip.clip_id}: " + "\n".join(textwrap.wrap(clip.captions[0], 110)), fontsize=9, loc="left"
        )
        ax.set_ylabel("mel band")
    axes[-1, 0].set_xlabel("time (s)")
    fig.tight_layout()
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return out_path
