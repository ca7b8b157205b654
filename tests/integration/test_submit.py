"""`lorapipe submit` / `lorapipe jobs` against a real Ray head started with `ray start` on 127.0.0.1,
token authentication on. The head runs in its own session and temp dir and is torn down by
killing exactly the processes of that session (never a global `ray stop`)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from procs import RayHead, free_port, session_pids

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
SECRET = "hf_not_for_printing_4242"
SUBMITTED: list[str] = []


@pytest.fixture(scope="module")
def ray_head():
    with RayHead(num_cpus=4) as head:
        deadline = time.time() + 60
        while time.time() < deadline:  # the dashboard's job module comes up after `ray start` returns
            try:
                if requests.get(f"{head.address}/api/jobs/", headers=_auth(head), timeout=5).ok:
                    break
            except requests.RequestException:
                pass
            time.sleep(1)
        yield head
    leftover = session_pids(head.session)
    assert not leftover, f"Ray processes left behind: {leftover}"


def _auth(head: RayHead) -> dict:
    return {"Authorization": f"Bearer {head.token}"}


def lorapipe(head: RayHead, *args: str, token: str | None = "head", extra_env: dict | None = None,
             timeout: float = 180) -> subprocess.CompletedProcess:
    """Run the CLI as a user would: a fresh process, an explicit environment."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "MLFLOW_TRACKING_URI")}
    if token:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=head.token if token == "head" else token)
    env.update(extra_env or {})
    return subprocess.run([str(BIN / "lorapipe"), *args], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=Path(__file__).resolve().parents[2])


def job_status(head: RayHead, job_id: str) -> str:
    r = requests.get(f"{head.address}/api/jobs/{job_id}", headers=_auth(head), timeout=10)
    r.raise_for_status()
    return r.json()["status"]


def wait_for(head: RayHead, job_id: str, statuses: tuple[str, ...], timeout: float) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = job_status(head, job_id)
        if status in statuses:
            return status
        time.sleep(1)
    raise AssertionError(f"job {job_id} still {status} after {timeout}s, wanted {statuses}")


def submitted_id(stdout: str) -> str:
    m = re.search(r"submitted job (\S+) to", stdout)
    assert m, stdout
    SUBMITTED.append(m.group(1))
    return m.group(1)


def one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("lorapipe: error: "), r.stderr
    return r.stderr


def test_submitted_training_job_writes_a_run_and_an_mlflow_run(ray_head, tmp_path):
    t0 = time.time()
    r = lorapipe(ray_head, "submit", "configs/tiny-cpu.yaml", "--address", ray_head.address, "--follow",
                 "train.max_steps=6", "train.eval_every=3", "train.checkpoint_every=3", "train.report_every=3",
                 "train.warmup_steps=0", "data.max_examples=120", f"run.output_dir={tmp_path / 'runs'}",
                 f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
                 extra_env={"HF_TOKEN": SECRET}, timeout=420)
    printed = r.stdout + r.stderr
    assert r.returncode == 0, printed[-4000:]
    job_id = submitted_id(r.stdout)
    assert f"lorapipe jobs logs {job_id} --follow --address {ray_head.address}" in r.stdout
    assert "HF_TOKEN" in r.stdout and SECRET not in printed
    assert job_status(ray_head, job_id) == "SUCCEEDED"
    print(f"submit --follow: {time.time() - t0:.0f}s")

    runs = [p for p in (tmp_path / "runs").iterdir() if not p.name.startswith(("_", "."))]
    assert len(runs) == 1, runs
    run = runs[0]
    assert (run / "COMPLETE").is_file() and (run / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((run / "metrics.json").read_text())["train_steps"] == 6
    import mlflow

    run_id = json.loads((run / "lineage.json").read_text())["mlflow_run_id"]
    got = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id)
    assert got.info.status == "FINISHED" and got.data.metrics["final_train_steps"] == 6

    logs = lorapipe(ray_head, "jobs", "logs", job_id, "--address", ray_head.address)
    assert logs.returncode == 0 and "run directory" in logs.stdout and "eval loss" in logs.stdout, logs.stdout[-3000:]
    # RAY_ADDRESS in place of --address; metadata shown, no secret anywhere.
    status = lorapipe(ray_head, "jobs", "status", job_id, extra_env={"RAY_ADDRESS": ray_head.address})
    assert status.returncode == 0 and f"{job_id}: SUCCEEDED" in status.stdout, status.stderr
    assert "lorapipe.config: tiny-cpu" in status.stdout and "lorapipe.user:" in status.stdout
    assert SECRET not in status.stdout + logs.stdout


def test_bad_config_is_refused_locally_and_fails_the_job_with_the_same_line(ray_head):
    before = requests.get(f"{ray_head.address}/api/jobs/", headers=_auth(ray_head), timeout=10).json()
    err = one_line_error(lorapipe(ray_head, "submit", "configs/tiny-cpu.yaml", "train.max_stepz=5",
                                  "--address", ray_head.address))
    assert "unknown key 'train.max_stepz'" in err
    after = requests.get(f"{ray_head.address}/api/jobs/", headers=_auth(ray_head), timeout=10).json()
    assert len(after) == len(before), "a refused config must submit nothing"

    r = lorapipe(ray_head, "submit", "configs/tiny-cpu.yaml", "train.max_stepz=5", "--no-validate", "--follow",
                 "--address", ray_head.address, timeout=240)
    job_id = submitted_id(r.stdout)
    assert r.returncode == 1 and f"job {job_id} FAILED" in r.stderr, (r.stdout[-2000:], r.stderr[-2000:])
    assert job_status(ray_head, job_id) == "FAILED"
    # The head is this machine: relative outputs and the default MLflow store are pinned to the project.
    root = Path(__file__).resolve().parents[2]
    assert f"run.output_dir={root / 'runs'}" in r.stdout
    assert f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}" in r.stdout
    logs = lorapipe(ray_head, "jobs", "logs", job_id, "--address", ray_head.address).stdout
    errors = [ln for ln in logs.splitlines() if ln.startswith("lorapipe: error: ")]
    assert errors == [f"lorapipe: error: {err.removeprefix('lorapipe: error: ').strip()}"], logs[-2000:]
    assert "Traceback" not in logs


def test_stop_a_running_job(ray_head, tmp_path):
    r = lorapipe(ray_head, "submit", "configs/tiny-cpu.yaml", "--address", ray_head.address,
                 "train.max_steps=2000", "train.eval_every=1000", "train.checkpoint_every=1000",
                 f"run.output_dir={tmp_path / 'runs'}", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}")
    assert r.returncode == 0, r.stderr
    job_id = submitted_id(r.stdout)
    wait_for(ray_head, job_id, ("RUNNING",), timeout=120)
    stop = lorapipe(ray_head, "jobs", "stop", job_id, "--address", ray_head.address)
    assert stop.returncode == 0 and f"stop requested for job {job_id}" in stop.stdout, stop.stderr
    assert wait_for(ray_head, job_id, ("STOPPED", "FAILED", "SUCCEEDED"), timeout=90) == "STOPPED"
    again = lorapipe(ray_head, "jobs", "stop", job_id, "--address", ray_head.address)
    assert again.returncode == 0 and "is not running (STOPPED)" in again.stdout


def test_jobs_list_shows_the_submitted_jobs(ray_head):
    if not SUBMITTED:
        pytest.skip("run with the submitting tests")
    r = lorapipe(ray_head, "jobs", "list", "--address", ray_head.address)
    assert r.returncode == 0, r.stderr
    for job_id in SUBMITTED:
        line = next(ln for ln in r.stdout.splitlines() if ln.startswith(job_id))
        assert "tiny-cpu" in line and "job_entry.sh train --no-progress configs/tiny-cpu.yaml" in line


def test_unknown_job_and_unreachable_cluster_are_one_line_errors(ray_head):
    for action in (["status"], ["logs"], ["logs", "--follow"], ["stop"]):
        err = one_line_error(lorapipe(ray_head, "jobs", *action, "raysubmit_nosuchjob", "--address", ray_head.address))
        assert "no job 'raysubmit_nosuchjob'" in err
    err = one_line_error(lorapipe(ray_head, "jobs", "list", "--address", f"http://127.0.0.1:{free_port()}"))
    assert "cannot reach the Ray dashboard" in err


def test_a_client_without_the_token_is_refused(ray_head, tmp_path):
    home = {"HOME": str(tmp_path)}  # no ~/.ray/auth_token to fall back on
    err = one_line_error(lorapipe(ray_head, "jobs", "list", "--address", ray_head.address, token=None, extra_env=home))
    assert "needs a token" in err and ray_head.token not in err
    err = one_line_error(lorapipe(ray_head, "submit", "configs/tiny-cpu.yaml", "--address", ray_head.address,
                                  token=None, extra_env=home))
    assert "needs a token" in err
    err = one_line_error(lorapipe(ray_head, "jobs", "list", "--address", ray_head.address, token="0" * 64))
    assert "refused the token" in err


def train_workers_on(head: RayHead) -> int:
    """How many Ray Train worker processes this head has run (their logs say what they were)."""
    logs = head.tmp / "ray" / "session_latest" / "logs"
    return sum(":actor_name:RayTrainWorker" in f.read_text(errors="replace") for f in logs.glob("worker-*.out"))


def test_train_joins_the_cluster_running_on_this_machine(ray_head, tmp_path):
    """With a `ray start` head up (and RAY_ADDRESS unset), `lorapipe train` joins it, as ray.init()
    would, instead of failing on sizing arguments or starting a second cluster; the head stays up."""
    before = train_workers_on(ray_head)
    r = lorapipe(ray_head, "train", "configs/tiny-cpu.yaml", "train.max_steps=3", "train.eval_every=3",
                 "train.checkpoint_every=3", "train.report_every=3", "train.warmup_steps=0", "data.max_examples=120",
                 f"run.output_dir={tmp_path / 'runs'}", "mlflow.enabled=false", "run.name=joined", "--no-progress",
                 extra_env={"RAY_TMPDIR": str(ray_head.tmp)}, timeout=420)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert re.search(r"ray: joining the cluster already running on this machine at \S+:\d+ ", r.stdout), r.stdout
    assert json.loads((tmp_path / "runs" / "joined" / "metrics.json").read_text())["train_steps"] == 3
    assert train_workers_on(ray_head) == before + 2  # the run's two workers ran on the head
    assert requests.get(f"{ray_head.address}/api/jobs/", headers=_auth(ray_head), timeout=10).ok
