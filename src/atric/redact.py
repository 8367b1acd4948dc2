"""Secrets out of every message, log line, MLflow tag and param: one helper, used everywhere.

``redact(text)`` masks
  * the password of any ``scheme://user:password@host`` URL (tracking URIs, Optuna and
    MLflow backend stores, S3 endpoints, DVC remotes) -> ``scheme://user:***@host``;
  * the values of secret-looking query parameters (``?password=``, ``X-Amz-Signature=``,
    ``token=``, ``aws_secret_access_key=`` ...);
  * the current values of the environment variables that hold credentials
    (``AWS_SECRET_ACCESS_KEY``, ``MLFLOW_TRACKING_PASSWORD`` ...), wherever they appear;
  * the password of every URL the process was given (``register_url``; the URL-valued
    environment variables such as ``ATRIC_OPTUNA_STORAGE``), in every form a library may print
    it: as written, URL-decoded and URL-encoded. A password may hold any character ("/", " ",
    "@"): it is what lies between the user's ":" and the URL's last "@".
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any
from urllib.parse import quote, unquote

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
# Environment variables holding URLs whose passwords are secrets (the URLs themselves are not).
URL_ENV_VARS = ("ATRIC_OPTUNA_STORAGE", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_BACKEND_STORE_URI")
_MIN_SECRET_LEN = 4  # shorter env values would mask ordinary words
_registered: set[str] = set()

# A URL's "user:password@" in free text: the password runs to the last "@" of the URL (any "/",
# ":" or unencoded "@" in it too); a space ends free text's URL, so spaces are covered by
# register_url (the URL as given) instead.
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^/\s:@]*):(?P<pw>[^\s'\"]*)@")
_SECRET_QUERY = re.compile(
    r"(?P<key>[?&;](?:[A-Za-z0-9_\-]*(?:password|passwd|secret|token|signature|credential|apikey|api_key)"
    r"[A-Za-z0-9_\-]*))=(?P<value>[^&\s#'\"]*)",
    re.IGNORECASE,
)


def url_password(url: str) -> str | None:
    """The password of ``scheme://user:password@host...`` as written (any character), or None."""
    start = url.find("://")
    if start < 0:
        return None
    rest = url[start + 3 :]
    userinfo = rest[: rest.rfind("@")] if "@" in rest else ""
    password = userinfo.split(":", 1)[1] if ":" in userinfo else ""
    return password or None


def _forms(secret: str) -> set[str]:
    """A password as written, decoded and encoded: what drivers and libraries may print."""
    return {secret, unquote(secret), quote(unquote(secret), safe="")}


def register_url(url: str) -> None:
    """Mask this URL's password, in all its forms, in everything ``redact`` sees from now on."""
    password = url_password(url)
    if password:
        _registered.update(f for f in _forms(password) if len(f) >= _MIN_SECRET_LEN)


def _secrets() -> list[str]:
    found = set(_registered)
    for name in SECRET_ENV_VARS:
        value = os.environ.get(name, "")
        if len(value) >= _MIN_SECRET_LEN:
            found.add(value)
    for name in URL_ENV_VARS:
        password = url_password(os.environ.get(name, ""))
        if password:
            found.update(f for f in _forms(password) if len(f) >= _MIN_SECRET_LEN)
    return sorted(found, key=len, reverse=True)  # a longer form first: no half-masked remainder


def redact(text: Any) -> str:
    """``text`` (anything; ``str()`` of it) with passwords, secret query values and secret env values masked."""
    out = str(text)
    out = _URL_PASSWORD.sub(lambda m: f"{m['head']}:{MASK}@" if m["pw"] else m[0], out)
    out = _SECRET_QUERY.sub(lambda m: f"{m['key']}={MASK}", out)
    for secret in _secrets():
        out = out.replace(secret, MASK)
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
