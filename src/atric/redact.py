"""Secrets out of every message, log line, MLflow tag and param: one helper, used everywhere.

``redact(text)`` masks
  * the password of any ``scheme://user:password@host`` URL (tracking URIs, Optuna and
    MLflow backend stores, S3 endpoints, DVC remotes) -> ``scheme://user:***@host``;
  * the values of secret-looking query parameters (``?password=``, ``X-Amz-Signature=``,
    ``token=``, ``aws_secret_access_key=`` ...);
  * the current values of the environment variables that hold credentials
    (``AWS_SECRET_ACCESS_KEY``, ``MLFLOW_TRACKING_PASSWORD`` ...), wherever they appear.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

MASK = "***"
# Environment variables whose values are secrets wherever they show up.
SECRET_ENV_VARS = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "PGPASSWORD",
    "ATRIC_S3_SECRET_KEY",
)
_MIN_SECRET_LEN = 4  # shorter env values would mask ordinary words

# A URL's "user:password@": the password runs to the last "@" before the host (unencoded "@" in it too).
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^/\s:@]*):(?P<pw>[^/\s]*)@")
_SECRET_QUERY = re.compile(
    r"(?P<key>[?&;](?:[A-Za-z0-9_\-]*(?:password|passwd|secret|token|signature|credential|apikey|api_key)"
    r"[A-Za-z0-9_\-]*))=(?P<value>[^&\s#'\"]*)",
    re.IGNORECASE,
)


def redact(text: Any) -> str:
    """``text`` (anything; ``str()`` of it) with passwords, secret query values and secret env values masked."""
    out = str(text)
    out = _URL_PASSWORD.sub(lambda m: f"{m['head']}:{MASK}@" if m["pw"] else m[0], out)
    out = _SECRET_QUERY.sub(lambda m: f"{m['key']}={MASK}", out)
    for name in SECRET_ENV_VARS:
        value = os.environ.get(name, "")
        if len(value) >= _MIN_SECRET_LEN:
            out = out.replace(value, MASK)
    return out


_installed = False


def install_log_redaction() -> None:
    """Redact every log record of this process (ours, MLflow's, urllib3's) when it is created.

    A record factory, not a handler filter: it also covers handlers configured later
    (``logging.basicConfig`` in the scripts) and third-party loggers.
    """
    global _installed
    if _installed:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: leave it to logging's own error path
            return record
        cleaned = redact(message)
        if cleaned != message or record.args:
            record.msg, record.args = cleaned, None
        return record

    logging.setLogRecordFactory(factory)
    _installed = True
