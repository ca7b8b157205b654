"""The MLflow deployments under infra/mlflow run with authentication, with no credential in a file.

Pure file checks plus the image's entrypoint script run with `sh` (no docker): the config it
writes is read back with MLflow's own reader. A real server started through the same script is in
tests/integration/test_auth.py.
"""
from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
MLFLOW = ROOT / "infra" / "mlflow"
ENTRYPOINT = MLFLOW / "auth-entrypoint.sh"


def k8s_container() -> dict:
    docs = list(yaml.safe_load_all((MLFLOW / "k8s" / "mlflow.yaml").read_text()))
    (dep,) = [d for d in docs if d and d["kind"] == "Deployment"]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return c


def image_entrypoint() -> str:
    dockerfile = (MLFLOW / "Dockerfile").read_text()
    copied = re.search(r"^COPY .*auth-entrypoint\.sh (\S+)$", dockerfile, re.MULTILINE)
    entry = re.search(r'^ENTRYPOINT \["([^"]+)"\]$', dockerfile, re.MULTILINE)
    assert copied and entry and copied.group(1) == entry.group(1), "Dockerfile does not run the copied entrypoint"
    return entry.group(1)


def test_compose_and_k8s_start_the_basic_auth_app_through_the_image_entrypoint():
    svc = yaml.safe_load((MLFLOW / "docker-compose.yaml").read_text())["services"]["mlflow"]
    assert "--app-name basic-auth" in svc["command"]
    assert svc["environment"]["MLFLOW_AUTH_DATABASE_URI"].startswith("postgresql://${POSTGRES_USER}:")
    c = k8s_container()
    assert c["command"] == [image_entrypoint(), "mlflow", "server"]
    assert c["args"][c["args"].index("--app-name") + 1] == "basic-auth"


def test_k8s_auth_settings_come_from_secrets_and_resolve_in_order():
    env = k8s_container()["env"]
    names = [e["name"] for e in env]
    db = next(e for e in env if e["name"] == "MLFLOW_AUTH_DATABASE_URI")["value"]
    for ref in re.findall(r"\$\((\w+)\)", db):  # Kubernetes expands only variables defined earlier
        assert names.index(ref) < names.index("MLFLOW_AUTH_DATABASE_URI"), ref
    for key in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        ref = next(e for e in env if e["name"] == key)["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "mlflow-auth", "key": key}


def test_server_image_pins_flask_wtf_as_constraints_do():
    pin = re.search(r"^Flask-WTF==(\S+)$", (ROOT / "constraints.txt").read_text(), re.MULTILINE | re.IGNORECASE)
    assert pin and f"Flask-WTF=={pin.group(1)}" in (MLFLOW / "Dockerfile").read_text()


def test_entrypoint_writes_a_private_config_mlflow_reads_then_runs_the_command(tmp_path):
    ini = tmp_path / "auth" / "basic_auth.ini"
    env = {"PATH": os.environ["PATH"], "MLFLOW_AUTH_CONFIG_PATH": str(ini),
           "MLFLOW_AUTH_DATABASE_URI": "postgresql://mlflow:db-pw@postgres:5432/mlflow"}
    done = subprocess.run(["sh", str(ENTRYPOINT), "sh", "-c", 'echo "ran with $MLFLOW_AUTH_CONFIG_PATH"'],
                          env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and done.stdout.strip() == f"ran with {ini}"
    assert stat.S_IMODE(ini.stat().st_mode) == 0o600
    code = ("from mlflow.server.auth.config import read_auth_config as r; c = r(); "
            "print(c.database_uri, c.default_permission, c.admin_username, c.admin_password, c.auth_cache_ttl_seconds)")
    read = subprocess.run([sys.executable, "-c", code], env={**env, "MLFLOW_AUTH_ADMIN_PASSWORD": ""},
                          capture_output=True, text=True, timeout=120)
    assert read.stdout.split() == ["postgresql://mlflow:db-pw@postgres:5432/mlflow", "READ", "admin", "None", "0"]


def test_entrypoint_refuses_to_start_without_the_user_database(tmp_path):
    done = subprocess.run(["sh", str(ENTRYPOINT), "true"], env={"PATH": os.environ["PATH"]},
                          capture_output=True, text=True, timeout=30)
    assert done.returncode != 0 and "MLFLOW_AUTH_DATABASE_URI" in done.stderr
