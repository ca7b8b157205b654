"""Real kills on a real local Ray: a SIGKILLed worker is replaced and the run continues from its
last checkpoint to the same adapter as an uninterrupted run; a killed driver resumes exactly; a kill
in the middle of a checkpoint write leaves a directory that is never used."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from procs import wait_registered
from safetensors.torch import load_file

pytestmark = pytest.mark.integration
LORAPIPE = str(Path(sys.executable).with_name("lorapipe"))
# fp32, no 4-bit, no dropout: every source of difference except the restart itself is removed.
EXACT = ["model.quantization=none", "model.dtype=fp32", "lora.dropout=0.0", "train.max_steps=24",
         "train.checkpoint_every=4", "train.report_every=2", "train.eval_every=12", "run.max_failures=2"]
# A kill after checkpoint 4 or 8 still lands well before the end: 16 steps (~15 s of training here) is
# far more than the second between a checkpoint's registration and the kill.
STEPS = 24


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
    wait_registered(storage, "checkpoint_step_0000008")
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
    proc.wait()
    time.sleep(2)
    # Ray resumes from the newest checkpoint it registered before the kill.
    registered = max(int(n) for n in re.findall(r"checkpoint_step_(\d{7})",
                                                (storage / "checkpoint_manager_snapshot.json").read_text()))
    assert registered < STEPS
    # A newer checkpoint directory without its marker (what a kill mid-upload leaves) is never taken.
    from pipelines.train.checkpoint import latest_complete_checkpoint

    torn = storage / f"checkpoint_step_{registered + 2:07d}"
    shutil.copytree(storage / f"checkpoint_step_{registered:07d}", torn)
    (torn / "COMPLETE").unlink()
    assert latest_complete_checkpoint(storage).name != torn.name
    out = subprocess.run([LORAPIPE, "train", "configs/tiny-cpu.yaml", "--resume", str(storage), "--no-progress"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    from pipelines.artifacts.rundir import RunDir

    run = RunDir.open(tmp_path / "runs" / "interrupted")
    metrics = run.metrics()
    assert metrics["train_steps"] == STEPS and metrics["resumed_from_step"] == [registered]
    steps = [m["step"] for m in run.history()]
    assert steps == sorted(set(steps)), steps  # nothing reported twice: no step was redone
    assert max(steps) == STEPS


def test_kill_during_a_checkpoint_write_resumes_from_the_last_complete_one(tmp_path):
    """Rank 0 is SIGKILLed in the middle of writing step 8's checkpoint (all files but the marker):
    the half-written directory is never registered or restored; the restart continues from step 4."""
    started = time.time()
    env = {**os.environ, "LORAPIPE_FAULT_KILL_IN_CHECKPOINT": "8"}
    args = ["configs/tiny-cpu.yaml", *EXACT, f"run.output_dir={tmp_path / 'runs'}", "run.name=torn",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "data.max_examples=120", "train.lr=0.01"]
    out = subprocess.run([LORAPIPE, "train", *args, "--no-progress"], env=env, capture_output=True, text=True,
                         timeout=900, start_new_session=True)
    assert out.returncode == 0, out.stderr[-3000:]
    from pipelines.artifacts.rundir import RunDir

    run = RunDir.open(tmp_path / "runs" / "torn")
    metrics = run.metrics()
    assert metrics["train_steps"] == STEPS and metrics["restarts"] == 1 and metrics["resumed_from_step"] == [4]
    steps = [m["step"] for m in run.history()]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS
    # The torn write exists (so the kill did land mid-write) and lacks only its marker.
    torn = [p for p in Path(tempfile.gettempdir()).glob("lorapipe-ckpt-r0-*")
            if p.stat().st_mtime >= started and (p / "trainer_state.json").is_file()]
    assert torn and all(not (p / "COMPLETE").exists() for p in torn)
    assert json.loads((torn[0] / "trainer_state.json").read_text())["step"] == 8
    for p in torn:
        shutil.rmtree(p)
    # Every checkpoint Ray kept is complete; the final one came from the restarted workers.
    storage = tmp_path / "runs" / "_ray" / "torn"
    assert all((c / "COMPLETE").is_file() for c in storage.glob("checkpoint_step_*"))
    assert json.loads((storage / f"checkpoint_step_{STEPS:07d}" / "trainer_state.json").read_text())["restarts"] == 1


def test_killed_worker_is_replaced_and_result_matches_uninterrupted(ray_local, tiny_config, tmp_path):
    from pipelines.train.driver import train

    reference = train(tiny_config(*EXACT, "run.name=reference"), progress=False)
    cfg = tiny_config(*EXACT, "run.name=faulty")
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(run=train(cfg, progress=False)))
    thread.start()
    wait_registered(Path(cfg.storage_path()) / "faulty", "checkpoint_step_0000004")
    workers = _train_workers_of_this_cluster()
    assert workers, "no Ray Train worker process found"
    os.kill(workers[0].pid, signal.SIGKILL)
    thread.join(timeout=900)
    run = result["run"]
    metrics = run.metrics()
    assert metrics["restarts"] >= 1 and metrics["train_steps"] == STEPS
    assert metrics["resumed_from_step"][0] % 4 == 0 and 4 <= metrics["resumed_from_step"][0] < STEPS
    ref, got = _adapter(reference), _adapter(run)
    assert ref.keys() == got.keys()
    for key in ref:
        assert torch.allclose(ref[key], got[key], atol=1e-6, rtol=0), (key, (ref[key] - got[key]).abs().max())
