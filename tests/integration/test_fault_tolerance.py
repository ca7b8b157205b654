"""Real kills on a real local Ray: a SIGKILLed worker is replaced and the run continues from its
last checkpoint to the same adapter as an uninterrupted run; a killed driver resumes exactly."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.integration
LORAPIPE = str(Path(sys.executable).with_name("lorapipe"))
# fp32, no 4-bit, no dropout: every source of difference except the restart itself is removed.
EXACT = ["model.quantization=none", "model.dtype=fp32", "lora.dropout=0.0", "train.max_steps=12",
         "train.checkpoint_every=4", "train.report_every=2", "train.eval_every=6", "run.max_failures=2"]


def _wait_registered(run_path: Path, name: str, timeout: float = 400) -> None:
    """Until Ray Train's checkpoint manager has recorded `name` (what a restart resumes from)."""
    snapshot = run_path / "checkpoint_manager_snapshot.json"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if snapshot.is_file() and name in snapshot.read_text():
            return
        time.sleep(0.5)
    raise AssertionError(f"{name} not registered in {snapshot} after {timeout}s")


def _train_workers_of_this_cluster() -> list[psutil.Process]:
    """Ray Train worker processes started by this test's raylet (never another cluster's)."""
    import ray
    from ray._private import ray_constants

    raylet = ray._private.worker._global_node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
    return [p for p in psutil.Process(raylet).children(recursive=True)
            if "RayTrainWorker" in " ".join(p.cmdline() or [])]


def _adapter(run) -> dict[str, torch.Tensor]:
    return load_file(str(run.adapter / "adapter_model.safetensors"))


def test_killed_driver_resumes_without_redoing_steps(tmp_path):
    args = ["configs/tiny-cpu.yaml", *EXACT, f"run.output_dir={tmp_path / 'runs'}", "run.name=interrupted",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "data.max_examples=120", "train.lr=0.01"]
    proc = subprocess.Popen([LORAPIPE, "train", *args, "--no-progress"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    storage = tmp_path / "runs" / "_ray" / "interrupted"
    _wait_registered(storage, "checkpoint_step_0000008")
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
    proc.wait()
    time.sleep(2)
    out = subprocess.run([LORAPIPE, "train", "configs/tiny-cpu.yaml", "--resume", str(storage), "--no-progress"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    from pipelines.rundir import RunDir

    run = RunDir.open(tmp_path / "runs" / "interrupted")
    metrics = run.metrics()
    assert metrics["train_steps"] == 12 and metrics["resumed_from_step"] == [8]
    steps = [json.loads(line)["step"] for line in (run.path / "history.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)), steps  # nothing reported twice: no step was redone
    assert max(steps) == 12


def test_killed_worker_is_replaced_and_result_matches_uninterrupted(ray_local, tiny_config, tmp_path):
    from pipelines.train import train

    reference = train(tiny_config(*EXACT, "run.name=reference"), progress=False)
    cfg = tiny_config(*EXACT, "run.name=faulty")
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(run=train(cfg, progress=False)))
    thread.start()
    _wait_registered(Path(cfg.storage_path()) / "faulty", "checkpoint_step_0000004")
    workers = _train_workers_of_this_cluster()
    assert workers, "no Ray Train worker process found"
    os.kill(workers[0].pid, signal.SIGKILL)
    thread.join(timeout=900)
    run = result["run"]
    metrics = run.metrics()
    assert metrics["restarts"] >= 1 and metrics["train_steps"] == 12
    assert metrics["resumed_from_step"][0] in (4, 8)
    ref, got = _adapter(reference), _adapter(run)
    assert ref.keys() == got.keys()
    for key in ref:
        assert torch.allclose(ref[key], got[key], atol=1e-6, rtol=0), (key, (ref[key] - got[key]).abs().max())
