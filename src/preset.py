"""Print a params preset as DVC `-S` flags, e.g. the paper's settings:

    dvc exp run $(python src/preset.py params/paper-clotho.yaml)
"""

from __future__ import annotations

import argparse
from atric.cli import run
from atric.config import preset_overrides


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset", help="a partial params.yaml, e.g. params/paper-clotho.yaml")
    args = parser.parse_args()
    print(" ".join(f"-S {item}" for item in preset_overrides(args.preset)))
    return 0


if __name__ == "__main__":
    run(main)
