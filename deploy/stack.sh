#!/usr/bin/env bash
# The production stack on this machine, without Docker: PostgreSQL (MLflow + Optuna stores),
# SeaweedFS S3 (MLflow artifacts, DVC remote) and an MLflow server, all on 127.0.0.1.
#
#   deploy/stack.sh up          start (credentials generated into .env on first use)
#   deploy/stack.sh status      each service up/down with its URL (exit 1 if any is down)
#   deploy/stack.sh env         export lines for clients:  eval "$(deploy/stack.sh env)"
#   deploy/stack.sh dvc-remote  make the stack's S3 the default DVC remote (keys in .dvc/config.local)
#   deploy/stack.sh down        stop everything (data stays in .stack/)
#
# Settings: environment variables or .env (see deploy/env.example); ATRIC_ENV_FILE and
# ATRIC_STACK_DIR move the .env file and the state dir. Logs: .stack/logs/.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; }

if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

case "${1:-}" in
    up)
        # PostgreSQL server binaries: Debian keeps them in /usr/lib/postgresql/N/bin; install when missing.
        if [ -z "${ATRIC_PG_BINDIR:-}" ] && ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null \
            && ! command -v initdb >/dev/null; then
            if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
                echo "installing PostgreSQL (apt-get install postgresql)..."
                apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
            else
                echo "error: PostgreSQL server not found: sudo apt-get install postgresql (or set ATRIC_PG_BINDIR)" >&2
                exit 2
            fi
        fi
        ;;
    down | status | env | dvc-remote) ;;
    -h | --help | help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
esac

PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" -m atric.ops.services "$@"
