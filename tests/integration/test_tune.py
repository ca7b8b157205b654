"""Ray Tune over Ray Train on a real local Ray: ASHA stops trials, best <= default, best YAML
trains, and a killed search resumes without re-running finished trials."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from procs import session_pids

pytestmark = pytest.mark.integration
LORAPIPE = str(Path(sys.executable).with_name("lorapipe"))


def _overrides(tmp: Path) -> list[str]:
    return [f"run.output_dir={tmp / 'runs'}", f"mlflow.tracking_uri=sqlite:///{tmp / 'mlflow.db'}"]


def test_killed_search_resumes_without_rerunning_finished_trials(tmp_path):
    args = ["configs/tiny-cpu-tune.yaml", *_overrides(tmp_path), "tune.num_samples=2", "tune.asha.enabled=false",
            "tune.max_concurrent_trials=1", "train.max_steps=16", "tune.name=resumable"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([LORAPIPE, "tune", *args, "--no-progress"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, env=env)
    exp_dir = tmp_path / "runs" / "resumable"
    deadline = time.time() + 420
    while time.time() < deadline and not _finished_trials(exp_dir):
        time.sleep(2)
    _kill_session(proc)  # the driver and the local Ray it started: exactly the processes of its session
    finished_before = _finished_trials(exp_dir)
    assert finished_before, "no trial finished before the kill"
    out = subprocess.run([LORAPIPE, "tune", *args, "--resume", "--no-progress"], capture_output=True, text=True,
                         timeout=900, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    trials = json.loads((exp_dir / "trials.json").read_text())
    assert len(trials) == 2 and all(t["steps"] == 16 for t in trials), trials
    # A finished trial is not run again: it has exactly one MLflow run.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("lorapipe-tiny-tune")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI's model-training view
    runs = client.search_runs([exp.experiment_id])
    for name in finished_before:
        trial_id = name.removeprefix("trial_")
        assert sum(r.data.tags.get("lorapipe.tune_trial_id") == trial_id for r in runs) == 1, trial_id


def test_search_stops_early_and_best_trains(ray_local, tmp_path):
    from pipelines.artifacts.rundir import RunDir
    from pipelines.config.load import load_config
    from pipelines.tune.search import tune
    from pipelines.tune.space import default_point

    cfg = load_config("configs/tiny-cpu-tune.yaml", _overrides(tmp_path))
    result = tune(cfg, progress=False)
    rows = result.rows
    assert len(rows) == 6
    assert any(r["status"] == "stopped early" for r in rows), rows
    assert all(r["status"] != "error" for r in rows), rows
    # Every trial ends in a contract run directory carrying its trial id.
    for r in rows:
        run = RunDir.open(r["run_dir"])
        assert run.lineage()["tune_trial_id"] == r["trial_id"]
    assert Path(result.plot_path).stat().st_size > 1000
    # MLflow: a parent run with one child per trial.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("lorapipe.kind") == "tune"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and len(children) == 6
    assert {a.path for a in client.list_artifacts(parents[0].info.run_id)} >= {"trials.json", "best_config.yaml", "trials.png"}

    # The config as written is the search's first point, so the best trial is never worse than it.
    default = [r for r in rows if r["params"] == default_point(cfg, cfg.tune)]
    assert default_point(cfg, cfg.tune) and len(default) == 1, [r["params"] for r in rows]
    assert default[0]["eval_loss"] is not None and result.best["eval_loss"] <= default[0]["eval_loss"]
    # The best config YAML is the best trial's config, complete: `lorapipe validate` takes it as it is,
    # and it trains what that trial trained (its run directory's config, but for the run's name).
    out = subprocess.run([LORAPIPE, "validate", result.best_config_path], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    best = load_config(result.best_config_path)
    trained = RunDir.open(next(r["run_dir"] for r in rows if r["trial_id"] == result.best["trial_id"])).config()
    assert best.model_dump(exclude={"run"}) == trained.model_dump(exclude={"run"})


def _kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL every process of the session `proc` leads (started with start_new_session=True): the
    driver, the Ray it started and that Ray's workers, which set process groups of their own but stay
    in the session. Nothing outside it is touched."""
    deadline = time.time() + 30
    while True:
        for pid in session_pids(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.poll()  # reap the driver, or it stays listed as a zombie of this session
        left = [pid for pid in session_pids(proc.pid) if not _is_zombie(pid)]
        if not left:
            proc.wait()
            return
        assert time.time() < deadline, f"processes of the killed search still alive: {left}"
        time.sleep(0.5)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _finished_trials(exp_dir: Path) -> set[str]:
    return {p.name for p in exp_dir.glob("trial_*") if (p / "COMPLETE").is_file()}
