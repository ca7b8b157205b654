"""Faults in services and secrets, against a real `mlflow server` on 127.0.0.1.

- The tracking server dies mid-run: training still finishes, the driver says which reports MLflow
  lacks, and `lorapipe sync` fills them in once the server is back.
- Rank 0's metric logger keeps batches while the server is away and flushes them when it returns.
- Secret values planted in the environment never reach MLflow (params, tags, metrics, artifacts,
  registered versions), the run directory, or printed output.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from procs import MlflowServer

pytestmark = pytest.mark.integration
LORAPIPE = str(Path(sys.executable).with_name("lorapipe"))
PLANTED = {
    "HF_TOKEN": "hf_PLANTEDhfTokenValue1",
    "AWS_SECRET_ACCESS_KEY": "PLANTEDawsSecretValue2",
    "AWS_ACCESS_KEY_ID": "PLANTEDawsKeyId3",
    "MLFLOW_TRACKING_PASSWORD": "PLANTEDmlflowPassword4",
    "MLFLOW_TRACKING_TOKEN": "PLANTEDmlflowToken5",
    "LORAPIPE_CUSTOM_API_KEY": "PLANTEDcustomApiKey6",
    "DB_PASSWORD": "PLANTEDdbPassword7",
}


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_TRACKING_URI"))}
    return {**env, **PLANTED}


def _reported_steps(uri: str, run_name: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("services")
    runs = c.search_runs([exp.experiment_id], f"attributes.run_name = '{run_name}'") if exp else []
    return sorted(m.step for m in c.get_metric_history(runs[0].info.run_id, "train_loss")) if runs else []


def _texts_of_tree(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in Path(root).rglob("*") if p.is_file()}


def _leaks(blobs: dict[str, bytes | str]) -> list[tuple[str, str]]:
    found = []
    for where, blob in blobs.items():
        data = blob.encode() if isinstance(blob, str) else blob
        found += [(where, name) for name, value in PLANTED.items() if value.encode() in data]
    return found


def _everything_in_mlflow(uri: str, dest: Path) -> dict[str, bytes | str]:
    """Every param, tag, metric key and artifact byte of every run, and every registered version."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri, registry_uri=uri)
    blobs: dict[str, bytes | str] = {}
    for exp in c.search_experiments():
        blobs[f"experiment {exp.name}"] = repr(exp)
        for run in c.search_runs([exp.experiment_id]):
            rid = run.info.run_id
            blobs[f"run {rid} data"] = repr(run.data.params) + repr(run.data.tags) + repr(run.data.metrics)
            out = dest / rid
            out.mkdir(parents=True)
            c.download_artifacts(rid, "", str(out))
            blobs.update(_texts_of_tree(out))
    for model in c.search_registered_models():
        blobs[f"model {model.name}"] = repr(model)
        for v in c.search_model_versions(f"name = '{model.name}'"):
            blobs[f"model {model.name} v{v.version}"] = repr(v)
    return blobs


def test_mlflow_outage_mid_run_then_sync_and_no_planted_secret_anywhere(tmp_path):
    server = MlflowServer(tmp_path / "mlflow").start()
    name = "outage"
    args = [LORAPIPE, "train", "configs/tiny-cpu.yaml", f"run.output_dir={tmp_path / 'runs'}", f"run.name={name}",
            f"mlflow.tracking_uri={server.uri}", "mlflow.experiment=services", "data.max_examples=120", "train.max_steps=30",
            "train.report_every=2", "train.eval_every=10", "train.checkpoint_every=10", "--no-progress"]
    outputs: dict[str, str] = {}
    try:
        proc = subprocess.Popen(args, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        deadline = time.time() + 600
        while not _reported_steps(server.uri, name) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.3)
        logged_before_outage = _reported_steps(server.uri, name)
        server.stop(signal.SIGKILL)  # the tracking server dies mid-run and stays away until training ends
        out, err = proc.communicate(timeout=900)
        outputs.update({"train stdout": out, "train stderr": err})
        assert proc.returncode == 0, err[-3000:]
        assert logged_before_outage and max(logged_before_outage) < 30

        from pipelines.artifacts.rundir import RunDir

        run = RunDir.open(tmp_path / "runs" / name)
        history_steps = [m["step"] for m in run.history()]
        assert history_steps == list(range(2, 31, 2))  # the run directory holds every report
        assert "MLflow lacks the metrics of" in out and f"lorapipe sync {run.path}" in out

        server.start()  # back: sync fills the gap and finishes the run
        sync = subprocess.run([LORAPIPE, "sync", str(run.path)], env=_env(), capture_output=True, text=True,
                              timeout=300)
        outputs.update({"sync stdout": sync.stdout, "sync stderr": sync.stderr})
        assert sync.returncode == 0, sync.stderr[-3000:]
        assert _reported_steps(server.uri, name) == history_steps
        from mlflow.tracking import MlflowClient

        mlflow_run = MlflowClient(server.uri).get_run(run.lineage()["mlflow_run_id"])
        assert mlflow_run.info.status == "FINISHED" and mlflow_run.data.metrics["final_train_steps"] == 30
        again = subprocess.run([LORAPIPE, "sync", str(run.path)], env=_env(), capture_output=True, text=True,
                               timeout=300)
        assert again.returncode == 0 and _reported_steps(server.uri, name) == history_steps  # idempotent

        reg = subprocess.run([LORAPIPE, "register", str(run.path), "--tracking-uri", server.uri], env=_env(),
                             capture_output=True, text=True, timeout=600)
        outputs.update({"register stdout": reg.stdout, "register stderr": reg.stderr})
        assert reg.returncode == 0, reg.stderr[-3000:]

        # The planted values are nowhere: not in MLflow, the run directory, checkpoints, or output.
        blobs = {**_everything_in_mlflow(server.uri, tmp_path / "downloaded"),
                 **_texts_of_tree(tmp_path / "runs"), **outputs}
        assert any("adapter_model.safetensors" in k for k in blobs)  # the scan did see the artifacts
        assert len(blobs) > 30
        assert _leaks(blobs) == []
    finally:
        server.stop()


def test_metrics_logger_keeps_batches_while_the_server_is_away(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import runs as tracking

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # as rank 0 sets it
    server = MlflowServer(tmp_path / "mlflow").start()
    try:
        run_id = tracking.start_run(server.uri, "lorapipe", "logger", {"a": 1}, {})
        logger = tracking.MetricsLogger(run_id, server.uri, backoff=0.5, max_backoff=1.0)
        logger.log({"train_loss": 3.0}, 1)
        server.stop()
        t0 = time.time()
        for step in (2, 3, 4):
            logger.log({"train_loss": 3.0 - step / 10}, step)
        assert time.time() - t0 < 30  # bounded: training is not held up by a dead server
        assert [s for _, s in logger.pending] == [2, 3, 4]
        server.start()
        time.sleep(1.1)  # past the backoff window
        logger.log({"train_loss": 2.0}, 5)
        assert logger.pending == []
        steps = [m.step for m in MlflowClient(server.uri).get_metric_history(run_id, "train_loss")]
        assert sorted(steps) == [1, 2, 3, 4, 5]
    finally:
        server.stop()
