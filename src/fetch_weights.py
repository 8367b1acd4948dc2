"""Download the official pretrained weights of an expert to the path params.yaml names.

    python src/fetch_weights.py panns_cnn14          # -> features.panns_cnn14.checkpoint
    python src/fetch_weights.py vggish --sha256 HEX  # also require this sha256

Resumable (rerun after an interruption), verified against the publisher's checksum,
written atomically. Offline it fails in seconds and says where to put the file by hand.
logmel, aisfx and yamnet need no download. Sources: atric.features.weights.SOURCES.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from atric.cli import add_params_arguments, params_from_args, run
from atric.errors import ConfigError
from atric.features.weights import DEFAULT_TIMEOUT, SOURCES, fetch


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("name", choices=sorted(SOURCES), help="the expert whose weights to download")
    parser.add_argument("--dest", help="where to write (default: features.<name>.checkpoint in params.yaml)")
    parser.add_argument("--sha256", help="also require this sha256 of the file")
    parser.add_argument(
        "--url", help="download from this mirror instead (the published checksum still applies)"
    )
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds without data before failing"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_params_arguments(parser)
    args = parser.parse_args()
    dest = args.dest
    if dest is None:
        dest = params_from_args(args).features.expert_settings(args.name).get("checkpoint")
        if not dest:
            raise ConfigError(f"features.{args.name}.checkpoint: not set in {args.params}; pass --dest")
    result = fetch(
        args.name,
        Path(dest),
        url=args.url,
        sha256=args.sha256,
        timeout=args.timeout,
        progress=not args.no_progress,
    )
    if result.downloaded_bytes == 0:
        print(f"{result.path}: already in place and verified (sha256 {result.sha256})")
    else:
        resumed = f", resumed after {result.resumed_from} bytes" if result.resumed_from else ""
        size = f"{result.downloaded_bytes} bytes{resumed}"
        print(f"{result.path}: downloaded and verified ({size}; sha256 {result.sha256})")
    return 0


if __name__ == "__main__":
    run(main)
