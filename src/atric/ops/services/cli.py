"""`python -m atric.ops.services up|down|status|env|dvc-remote` (deploy/stack.sh)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from atric.errors import AtricError
from atric.ops.services.settings import DEFAULT_BUCKET, ENV_FILE, Settings, StackError
from atric.ops.services.stack import Stack, configure_dvc_remote

# --------------------------------------------------------------------------- CLI


def ensure_bucket_from_env(bucket: str | None = None, timeout: float = 60) -> str:
    """Create the bucket with the client's own AWS_* settings (docker-compose: before mlflow server)."""
    from botocore.exceptions import BotoCoreError, ClientError

    from atric.ops.storage import make_client

    name = bucket or os.environ.get("ATRIC_S3_BUCKET", DEFAULT_BUCKET)
    deadline = time.monotonic() + timeout
    while True:
        try:
            make_client().create_bucket(Bucket=name)
            return name
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                return name
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied") or time.monotonic() > deadline:
                raise StackError(f"cannot create bucket {name!r}: {code}") from exc
        except BotoCoreError as exc:  # the S3 server is still starting
            if time.monotonic() > deadline:
                raise StackError(f"cannot create bucket {name!r}: {exc}") from exc
        time.sleep(1.0)


def _shell_quote(value: str) -> str:
    return "'" + value.replace("'", "'\\''") + "'"


def _print_status(stack: Stack) -> int:
    all_up = True
    for name, (up, url) in stack.status().items():
        all_up &= up
        print(f"{name:9s} {'up' if up else 'down':5s} {url}")
    return 0 if all_up else 1


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="atric.ops.services", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["up", "down", "status", "env", "dvc-remote", "ensure-bucket"])
    parser.add_argument("--env-file", type=Path, default=Path(os.environ.get("ATRIC_ENV_FILE", ENV_FILE)))
    parser.add_argument("--repo", type=Path, default=Path("."), help="dvc-remote: the DVC repo")
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        if args.command == "ensure-bucket":
            print(f"bucket {ensure_bucket_from_env()!r} ready")
            return 0
        settings = Settings.from_env(args.env_file, create=args.command == "up")
        stack = Stack(settings)
        if args.command == "up":
            timings = stack.up()
            print("started in " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
            _print_status(stack)
            print(f"use it:  eval \"$(deploy/stack.sh env)\"   (logs: {settings.state_dir}/logs)")
            return 0
        if args.command == "down":
            stack.down()
            print("stack stopped")
            return 0
        if args.command == "status":
            return _print_status(stack)
        if args.command == "env":
            # For `eval`: secrets go to stdout only when asked for, never to a log.
            for key, value in settings.client_env().items():
                print(f"export {key}={_shell_quote(value)}")
            return 0
        configure_dvc_remote(args.repo, settings)
        print(f"dvc remote 'stack' -> {settings.dvc_remote_url} at {settings.s3_endpoint} (keys in .dvc/config.local)")
        return 0
    except AtricError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


