"""Who may register and promote, against a real `mlflow server --app-name basic-auth` on 127.0.0.1.

The roles are granted by running the Python block of the README's "Access control" section as
the admin: users, the experiment and the registered models, EDIT for the training identity,
MANAGE on the models for the release identity; the reader relies on the server's
default_permission = READ. lorapipe speaks as whichever user the environment names.
"""
from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path

import pytest
from procs import MlflowServer
from test_registry import make_run_dir
from test_services import _everything_in_mlflow, _texts_of_tree

pytestmark = pytest.mark.integration
NAME = "tiny-reverse"  # registry.name of configs/tiny-cpu.yaml, as the README's grant commands name it
MERGED = f"{NAME}-merged"
EXPERIMENT = "lorapipe-tiny"  # mlflow.experiment of configs/tiny-cpu.yaml, which the run directory keeps
CRED_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
PASSWORDS = {user: f"pw-{user}-{secrets.token_urlsafe(12)}" for user in ("admin", "trainer", "release", "reader")}
ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINT = ROOT / "infra" / "mlflow" / "auth-entrypoint.sh"
README = ROOT / "README.md"
OUTPUTS: dict[str, str] = {}  # everything lorapipe printed, scanned for credentials at the end


class AuthMlflowServer(MlflowServer):
    """MlflowServer with MLflow's basic-auth app, started the way the server image starts it:
    infra/mlflow/auth-entrypoint.sh writes the auth config from the environment (users in a sqlite
    store of their own here), the admin's password comes from the environment only."""

    def command(self) -> list[str]:
        mlflow_bin, server, *rest = super().command()
        return ["sh", str(ENTRYPOINT), mlflow_bin, server, "--app-name", "basic-auth", *rest]

    def env(self) -> dict:
        return {**{k: v for k, v in os.environ.items() if k not in CRED_VARS},
                "MLFLOW_AUTH_CONFIG_PATH": str(self.root / "basic_auth.ini"),
                "MLFLOW_AUTH_DATABASE_URI": f"sqlite:///{self.root / 'auth.sqlite'}",
                "MLFLOW_AUTH_CACHE_TTL_SECONDS": "60",  # one password hash check per user, not per request
                "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORDS["admin"],
                "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no GenAI job workers: a faster start


@contextmanager
def as_user(user: str | None, password: str | None = None):
    """The process speaks to MLflow as `user` (None: no credentials at all)."""
    saved = {k: os.environ.pop(k, None) for k in CRED_VARS}
    if user:
        os.environ.update(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password or PASSWORDS[user])
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v


def readme_grant_commands() -> str:
    """The Python block of the README's "Access control" section, verbatim."""
    text = README.read_text()
    section = text[text.index("### Access control"):]
    return section[section.index("```python\n") + len("```python\n"):section.index("\n```", section.index("```python"))]


def grant_pipeline_roles(uri: str) -> None:
    """Run the README's grant commands as the admin, as a new user would paste them."""
    saved = dict(os.environ)
    os.environ.update({f"{user.upper()}_PASSWORD": pw for user, pw in PASSWORDS.items()}, MLFLOW_TRACKING_URI=uri)
    try:
        exec(compile(readme_grant_commands(), "README.md (Access control)", "exec"), {})
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = AuthMlflowServer(tmp_path_factory.mktemp("mlflow-auth")).start(timeout=300)
    try:
        with as_user("admin"):
            grant_pipeline_roles(srv.uri)
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, server):
    run = make_run_dir(tmp_path_factory.mktemp("runs"), "authrun", quantization="none", steps=2, uri=server.uri)
    assert run.config().mlflow.experiment == EXPERIMENT
    return run


def lorapipe(capsys, label: str, *argv: str) -> tuple[int, str]:
    """`lorapipe ARGV` in this process: exit status and stderr (all output kept for the scan)."""
    from pipelines.cli import main

    rc = main(list(argv))
    out = capsys.readouterr()
    OUTPUTS[f"{label} stdout"], OUTPUTS[f"{label} stderr"] = out.out, out.err
    return rc, out.err


def admin_client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(uri, registry_uri=uri)


def champion_version(uri: str):
    from mlflow.exceptions import MlflowException

    with as_user("admin"):
        try:
            return admin_client(uri).get_model_version_by_alias(MERGED, "champion").version
        except MlflowException:
            return None


def version_tags(uri: str, version: str) -> dict:
    with as_user("admin"):
        return dict(admin_client(uri).get_model_version(MERGED, version).tags)


def test_training_identity_registers_and_moves_candidate_but_not_champion(server, run_dir, capsys):
    uri = server.uri
    with as_user("trainer"):
        rc, err = lorapipe(capsys, "trainer register", "register", str(run_dir.path), "--name", NAME, "--tracking-uri", uri)
        assert rc == 0, err
        assert OUTPUTS["trainer register stdout"].startswith(f"registered: {NAME}-adapter v1, {MERGED} v1")
        rc, err = lorapipe(capsys, "trainer candidate", "promote", MERGED, "1", "--alias", "candidate", "--tracking-uri", uri)
        assert rc == 0, err
        for force in ((), ("--force", "--reason", "try")):
            rc, err = lorapipe(capsys, f"trainer champion {force}", "promote", MERGED, "1", *force, "--tracking-uri", uri)
            assert rc == 2 and err.count("\n") == 1
            assert "MANAGE permission on registered model 'tiny-reverse-merged'" in err and "'trainer' has EDIT" in err
    tags = version_tags(uri, "1")
    assert tags["lorapipe.promoted.candidate.by"] == "trainer"  # the server's identity, not the local login
    assert champion_version(uri) is None  # refused before any write: no alias, no champion tag
    assert not [k for k in tags if ".champion." in k]
    with as_user("admin"):
        assert admin_client(uri).get_registered_model(MERGED).tags["lorapipe.protected_aliases"] == "champion"


def test_release_identity_moves_champion_and_the_audit_tags_name_it(server, run_dir, capsys):
    uri = server.uri
    with as_user("trainer"):  # a second, worse version of the same model
        c = admin_client(uri)
        v1 = c.get_model_version(MERGED, "1")
        worse = {**v1.tags, "lorapipe.metric.eval_loss": repr(float(v1.tags["lorapipe.metric.eval_loss"]) + 1.0)}
        worse = {k: v for k, v in worse.items() if not k.startswith(("lorapipe.promoted.", "lorapipe.forced."))}
        v2 = c.create_model_version(MERGED, source=v1.source, run_id=v1.run_id, tags=worse).version
    with as_user("release"):
        rc, err = lorapipe(capsys, "release champion", "promote", MERGED, "1", "--tracking-uri", uri)
        assert rc == 0, err
        assert champion_version(uri) == "1" and version_tags(uri, "1")["lorapipe.promoted.champion.by"] == "release"
        rc, err = lorapipe(capsys, "release gated", "promote", MERGED, v2, "--tracking-uri", uri)
        assert rc == 1 and "refused" in err and champion_version(uri) == "1"  # the gate still applies
        rc, err = lorapipe(capsys, "release forced", "promote", MERGED, v2, "--force", "--reason", "canary",
                           "--tracking-uri", uri)
        assert rc == 0, err
    tags = version_tags(uri, v2)
    assert champion_version(uri) == v2
    assert tags["lorapipe.forced.champion.by"] == tags["lorapipe.promoted.champion.by"] == "release"
    assert tags["lorapipe.forced.champion.reason"] == "canary"
    with as_user("trainer"):  # going back is a rollback: an alias move like any other, MANAGE for champion
        rc, err = lorapipe(capsys, "trainer rollback", "rollback", MERGED, "--alias", "champion", "--to", "1",
                           "--reason", "canary failed", "--tracking-uri", uri)
    assert rc == 2 and "MANAGE" in err and champion_version(uri) == v2
    with as_user("release"):
        rc, err = lorapipe(capsys, "release rollback", "rollback", MERGED, "--alias", "champion", "--to", "1",
                           "--reason", "canary failed", "--tracking-uri", uri)
    assert rc == 0, err
    assert champion_version(uri) == "1"
    back = version_tags(uri, "1")
    assert back["lorapipe.rollback.champion.by"] == "release" and back["lorapipe.rollback.champion.reason"] == "canary failed"
    assert back["lorapipe.rollback.champion.from_version"] == v2


def test_reader_resolves_and_downloads_but_cannot_register_or_move_aliases(server, run_dir, capsys, tmp_path,
                                                                             monkeypatch):
    from pipelines.artifacts.resolve import resolve

    uri = server.uri
    monkeypatch.setenv("LORAPIPE_CACHE", str(tmp_path / "cache"))
    with as_user("admin"):
        runs_before = len(admin_client(uri).search_runs([admin_client(uri).get_experiment_by_name(EXPERIMENT).experiment_id]))
    with as_user("reader"):
        model = resolve(f"models:/{MERGED}@champion", uri)  # what eval and serve start from
        assert model.kind == "merged" and model.version == "1" and "champion" in model.aliases
        assert (model.model_path / "model.safetensors").stat().st_size > 1000
        rc, err = lorapipe(capsys, "reader show", "registry", "show", MERGED, "--tracking-uri", uri)
        assert rc == 0, err
        rc, err = lorapipe(capsys, "reader register", "register", str(run_dir.path), "--name", "readers-copy",
                           "--tracking-uri", uri)
        assert rc == 2 and err.count("\n") == 1
        assert "registering needs EDIT permission on experiment 'lorapipe-tiny'; MLflow user 'reader' has READ" in err
        rc, err = lorapipe(capsys, "reader candidate", "promote", MERGED, "1", "--alias", "candidate", "--tracking-uri", uri)
        assert rc == 2 and "EDIT permission on registered model 'tiny-reverse-merged'" in err and "has READ" in err
    with as_user("admin"):
        c = admin_client(uri)
        assert len(c.search_runs([c.get_experiment_by_name(EXPERIMENT).experiment_id])) == runs_before  # nothing begun
        assert not c.search_registered_models("name LIKE 'readers-copy%'")
        assert c.get_model_version_by_alias(MERGED, "candidate").version == "1"


def test_wrong_password_and_missing_credentials_are_one_line_errors(server, capsys):
    uri = server.uri
    with as_user("trainer", password="not-the-password"):
        rc, err = lorapipe(capsys, "wrong password", "promote", MERGED, "1", "--alias", "candidate", "--tracking-uri", uri)
    assert rc == 2 and err.count("\n") == 1
    assert "rejected the credentials of user 'trainer'" in err and "not-the-password" not in err
    with as_user(None):
        rc, err = lorapipe(capsys, "no credentials", "registry", "list", "--tracking-uri", uri)
    assert rc == 2 and err.count("\n") == 1
    assert "requires authentication: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in err


def test_no_credential_in_anything_logged_or_printed(server, run_dir, tmp_path):
    with as_user("admin"):
        blobs = {**_everything_in_mlflow(server.uri, tmp_path / "downloaded"), **_texts_of_tree(run_dir.path), **OUTPUTS,
                 "the auth app's config file": (server.root / "basic_auth.ini").read_text()}
    assert any("adapter_model.safetensors" in k for k in blobs) and len(OUTPUTS) >= 10  # the scan saw it all
    leaks = [(where, user) for where, blob in blobs.items() for user, pw in PASSWORDS.items()
             if pw.encode() in (blob.encode() if isinstance(blob, str) else blob)]
    assert leaks == []
