"""What every stage script shares: params loading with overrides, one error exit."""

from __future__ import annotations

import argparse
import atexit
import gc
import json
import os
import sys
from collections.abc import Callable

from atric.config import PARAMS_FILE, Params, load_params
from atric.errors import AtricError
from atric.redact import install_log_redaction, redact

EXIT_USER_ERROR = 2

# Keep every tool offline and quiet about analytics (DVC, HF hubs, MLflow telemetry).
for _name, _value in {
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
}.items():
    os.environ.setdefault(_name, _value)

# The interpreter's last garbage collection walks every object torch and MLflow made: ~1.3 s of
# each stage's exit on 2 cores (benchmarks/startup.py, exit_s). Frozen objects are skipped there; exit
# handlers registered later (logging, MLflow's end of run) still run before this one.
atexit.register(gc.freeze)


def add_params_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default=str(PARAMS_FILE), help="params file (default: params.yaml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a param, e.g. --set train.lr=0.003 (repeatable)",
    )


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """``--expert`` (repeatable) and ``--pooling``: which run, as train.experts and train.pooling."""
    parser.add_argument(
        "--expert", action="append", default=[], help="audio expert (repeatable): train.experts"
    )
    parser.add_argument("--pooling", help="audio pooling: train.pooling")


def run_overrides(args: argparse.Namespace) -> list[str]:
    """The params overrides that ``add_run_arguments``' flags ask for."""
    extra = []
    if args.expert:
        extra.append(f"train.experts={json.dumps(args.expert)}")
    if args.pooling:
        extra.append(f"train.pooling={json.dumps(args.pooling)}")
    return extra


def params_from_args(args: argparse.Namespace, extra: list[str] | None = None) -> Params:
    return load_params(args.params, [*args.overrides, *(extra or [])])


def run(main: Callable[[], int | None]) -> None:
    """Run a stage's main; an AtricError becomes one clear line on stderr and exit code 2.

    Every message is redacted (``atric.redact``): log records as they are made, the error
    line, and the traceback of an unexpected error (still exit code 1: a bug to report).
    """
    install_log_redaction()
    try:
        code = main()
    except AtricError as exc:
        print(f"error: {redact(' '.join(str(exc).split()))}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception:
        import traceback

        print(redact(traceback.format_exc()), file=sys.stderr, end="")
        sys.exit(1)
    sys.exit(code or 0)
