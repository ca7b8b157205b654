"""MLflow's refusals (HTTP 401/403) become one-line errors at once, never retried; identities of
servers without authentication are marked; credentials reach a job by name only.

The server-side behaviour (real basic-auth app) is in tests/integration/test_auth.py.
"""
from __future__ import annotations

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import PERMISSION_DENIED, RESOURCE_DOES_NOT_EXIST, UNAUTHENTICATED

from pipelines.core.errors import UserError
from pipelines.tracking.auth import AccessDenied, Identity, access_error, current_identity, local_user
from pipelines.tracking.runs import with_retries


def refusal(status: int, endpoint: str) -> MlflowException:
    """The exception MLflow's REST client raises for a 401/403 with a plain-text body."""
    code = PERMISSION_DENIED if status == 403 else UNAUTHENTICATED
    return MlflowException(f"API request to endpoint {endpoint} failed with error code {status} != 200. "
                           "Response body: 'Permission denied'", error_code=code)


@pytest.fixture
def as_trainer(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "trainer")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret-pw")
    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN", raising=False)


def test_403_is_not_retried_and_names_the_permission(as_trainer):
    calls = []

    def set_alias():
        calls.append(1)
        raise refusal(403, "/api/2.0/mlflow/registered-models/alias")

    with pytest.raises(AccessDenied) as e:
        with_retries(set_alias, what="set alias", first_delay=5.0)
    assert len(calls) == 1  # a refusal is final: no backoff
    msg = str(e.value)
    assert "\n" not in msg and "set alias" in msg and "'trainer'" in msg
    assert "EDIT permission on the registered model" in msg and "s3cret-pw" not in msg


@pytest.mark.parametrize("endpoint, needs", [
    ("/api/2.0/mlflow/runs/create", "EDIT permission on the run's experiment"),
    ("/api/2.0/mlflow/model-versions/create", "EDIT permission on the registered model"),
    ("/api/2.0/mlflow/model-versions/get", "READ permission on the registered model"),
    ("/api/2.0/mlflow/experiments/get-by-name", "READ permission on the experiment"),
])
def test_each_refused_endpoint_names_what_it_needs(as_trainer, endpoint, needs):
    assert needs in str(access_error(refusal(403, endpoint)))


def test_401_says_which_credentials_failed_without_the_password(as_trainer, monkeypatch):
    calls = []

    def search():
        calls.append(1)
        raise refusal(401, "/api/2.0/mlflow/experiments/search")

    with pytest.raises(UserError) as e:
        with_retries(search, first_delay=5.0)
    assert len(calls) == 1 and "rejected the credentials of user 'trainer'" in str(e.value)
    assert "s3cret-pw" not in str(e.value)
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    monkeypatch.setenv("HOME", "/nonexistent")  # no ~/.mlflow/credentials either
    assert "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in str(access_error(refusal(401, "/x")))


def test_other_errors_are_not_access_errors_and_are_retried():
    assert access_error(MlflowException("no such model", error_code=RESOURCE_DOES_NOT_EXIST)) is None
    assert access_error(ConnectionError("refused")) is None
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("refused")
        return "ok"

    assert with_retries(flaky, first_delay=0.01) == "ok" and len(calls) == 3


def test_identity_without_a_server_is_the_local_login_marked_unauthenticated():
    who = current_identity("sqlite:///unused.db")
    assert who == Identity(local_user(), authenticated=False)
    assert who.audit_name == f"{local_user()} (unauthenticated)"
    assert Identity("release", authenticated=True).audit_name == "release"


def test_submit_forwards_mlflow_credentials_by_name_and_keeps_them_out_of_metadata():
    from pipelines.cluster import submit

    environ = {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "MLFLOW_TRACKING_USERNAME": "trainer",
               "MLFLOW_TRACKING_PASSWORD": "s3cret-pw", "MLFLOW_TRACKING_TOKEN": "tok-123"}
    assert submit.forwarded_env(environ) == environ  # values travel in the job's runtime_env only
    meta = submit.job_metadata("tiny", "configs/tiny-cpu.yaml", "train", None, None)
    assert not any(v in repr(meta) for v in ("s3cret-pw", "tok-123"))
