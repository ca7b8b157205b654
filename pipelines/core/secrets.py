"""Keeping secrets out of params, tags, job metadata and printed output."""
from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

SECRET_NAME = re.compile(r"(TOKEN|KEY|SECRET|PASSWORD|PASSWD|CREDENTIAL)", re.IGNORECASE)
KNOWN_SECRET_VARS = {
    "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_USERNAME", "RAY_AUTH_TOKEN",
    "WANDB_API_KEY", "DATABRICKS_TOKEN",
}
REDACTED = "***"


def is_secret_name(name: str) -> bool:
    return name.upper() in KNOWN_SECRET_VARS or bool(SECRET_NAME.search(name))


def redact_uri(value: str) -> str:
    """http://user:pass@host/x -> http://***@host/x (credentials in URIs are secrets too)."""
    try:
        parts = urlsplit(value)
    except ValueError:
        return value
    if parts.password or (parts.username and "@" in parts.netloc):
        return urlunsplit(parts._replace(netloc=f"{REDACTED}@{parts.hostname}{':%d' % parts.port if parts.port else ''}"))
    return value


def redact_mapping(data: dict) -> dict:
    return {k: (REDACTED if is_secret_name(k) else redact_uri(v) if isinstance(v, str) else v) for k, v in data.items()}
