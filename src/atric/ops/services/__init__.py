"""The production stack on one machine, without Docker: PostgreSQL, SeaweedFS S3, MLflow server.

One implementation serves ``deploy/stack.sh`` (``python -m atric.ops.services up|down|status|env``)
and the integration tests (which start a throwaway stack in a temp dir).

Everything binds to 127.0.0.1. Credentials come from the environment or a git-ignored ``.env``;
missing ones are generated on the first ``up`` and appended to ``.env`` (mode 0600). Secrets
never appear on a command line (``ps`` shows those) or in the service logs: PostgreSQL reads
its password from a file deleted after ``initdb``, SeaweedFS from its identities file (0600),
MLflow from environment variables.
"""


from __future__ import annotations

from atric.ops.services.cli import ensure_bucket_from_env, main  # noqa: F401
from atric.ops.services.mlflow_server import MlflowServer  # noqa: F401
from atric.ops.services.postgres import Postgres, pg_bindir  # noqa: F401
from atric.ops.services.process import _venv_tool  # noqa: F401
from atric.ops.services.seaweed import SeaweedS3  # noqa: F401
from atric.ops.services.settings import (  # noqa: F401
    DEFAULT_BUCKET,
    DVC_PREFIX,
    ENV_FILE,
    HOST,
    MLFLOW_ARTIFACTS_PREFIX,
    MLFLOW_DB,
    OPTUNA_DB,
    REGION,
    STATE_DIR,
    Settings,
    StackError,
    free_port,
    port_open,
    read_env_file,
)
from atric.ops.services.stack import Stack, configure_dvc_remote  # noqa: F401
