"""Training spread over several Ray nodes: a head with no CPUs and three 1-CPU worker nodes
(ray.cluster_utils.Cluster), STRICT_SPREAD so each training worker is on its own node; losing one
of those nodes mid-run restarts the workers on the remaining two from the last checkpoint; checkpoints
in run.storage_path (a path every node sees), the run directory somewhere else.

The cluster runs in a child process (this file, run as a script): the pytest process may already
hold a session Ray (tests/integration/conftest.py), and one process can connect to one cluster."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from procs import session_pids, wait_registered

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_on_cluster(tmp: Path) -> dict:
    """Child process: start the cluster (a CPU-less head, three 1-CPU worker nodes), train twice
    (once undisturbed, once losing a worker node mid-run), report where the workers ran; always shut down."""
    import threading

    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    from pipelines.config.load import load_config
    from pipelines.train.driver import train

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": _free_port(),
        "dashboard_agent_listen_port": _free_port()})

    def config(name: str, *extra: str):
        return load_config(REPO / "configs" / "tiny-cpu.yaml", [
            "scaling.num_workers=2", "scaling.cpus_per_worker=1", "scaling.placement_strategy=STRICT_SPREAD",
            f"run.storage_path={tmp / 'shared'}", f"run.output_dir={tmp / 'runs'}", f"run.name={name}",
            f"mlflow.tracking_uri=sqlite:///{tmp / 'mlflow.db'}", "data.max_examples=120",
            "train.eval_every=3", "train.report_every=3", "train.warmup_steps=0", *extra])

    def worker_nodes_alive() -> list[str]:
        actors = list_actors(address=cluster.address, filters=[("class_name", "=", "RayTrainWorker"),
                                                                ("state", "=", "ALIVE")], detail=True, limit=100)
        return sorted(a.node_id for a in actors)

    try:
        nodes = [cluster.add_node(num_cpus=1) for _ in range(3)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        run = train(config("spread", "train.max_steps=6", "train.checkpoint_every=3"), progress=False)
        actors = list_actors(address=cluster.address, filters=[("class_name", "=", "RayTrainWorker")],
                             detail=True, limit=100)
        spread = {"run_dir": str(run.path), "train_worker_nodes": sorted(a.node_id for a in actors)}

        # Node loss: remove (ungracefully) a node holding a training worker once a checkpoint is registered.
        cfg = config("node_loss", "train.max_steps=24", "train.checkpoint_every=4", "train.eval_every=10",
                     "run.max_failures=2")
        result: dict = {}
        thread = threading.Thread(target=lambda: result.update(run=train(cfg, progress=False)))
        thread.start()
        wait_registered(tmp / "shared" / "node_loss", "checkpoint_step_0000004")
        before = worker_nodes_alive()
        victim = next(n for n in nodes if n.node_id in before)
        cluster.remove_node(victim, allow_graceful=False)
        thread.join(timeout=900)
        return {"spread": spread, "worker_nodes": sorted(n.node_id for n in nodes),
                "head_node": cluster.head_node.node_id, "node_loss": {
                    "run_dir": str(result["run"].path), "removed_node": victim.node_id, "nodes_before": before}}
    finally:
        ray.shutdown()
        cluster.shutdown()


def _kill_session(session: int) -> None:
    """Safety net if the child died without shutting its cluster down: its Ray processes share its session."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in session_pids(session):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + 10
        while session_pids(session) and time.time() < deadline:
            time.sleep(0.5)


@pytest.fixture(scope="module")
def cluster_runs(tmp_path_factory) -> dict:
    """One child process, one cluster, both training runs (a cluster start costs ~15 s here)."""
    tmp_path = tmp_path_factory.mktemp("cluster")
    ray_tmp = Path(tempfile.mkdtemp(prefix="lpmn-"))  # Ray's socket paths must stay short
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    # Own temp dir: Cluster() writes its address file there, not where other local `ray.init()`s look.
    env.update(RAY_TMPDIR=str(ray_tmp), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
               RAY_TRAIN_V2_ENABLED="1", PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}")
    out, log = tmp_path / "result.json", tmp_path / "child.log"
    t0 = time.time()
    with log.open("w") as log_file:
        child = subprocess.Popen([sys.executable, __file__, str(tmp_path), str(out)], cwd=REPO, env=env,
                                 start_new_session=True, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        child.wait(timeout=900)
    except subprocess.TimeoutExpired:
        pass
    finally:
        if child.poll() is None:
            child.kill()
        _kill_session(child.pid)
        left = session_pids(child.pid)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not left, f"Ray processes left behind: {left}"
    assert child.returncode == 0 and out.is_file(), log.read_text()[-5000:]
    print(f"cluster runs: {time.time() - t0:.0f}s")
    return {**json.loads(out.read_text()), "tmp": tmp_path}


def test_training_spreads_over_nodes_and_checkpoints_to_shared_storage(cluster_runs):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pipelines.artifacts.rundir import RunDir

    tmp_path = cluster_runs["tmp"]
    result = {**cluster_runs["spread"], "worker_nodes": cluster_runs["worker_nodes"],
              "head_node": cluster_runs["head_node"]}

    # One training worker on each worker node; none on the CPU-less head.
    assert len(result["train_worker_nodes"]) == 2 and len(set(result["train_worker_nodes"])) == 2
    assert set(result["train_worker_nodes"]) <= set(result["worker_nodes"])
    assert result["head_node"] not in result["train_worker_nodes"]

    # Both ranks wrote their part of each checkpoint into the shared storage path.
    run = RunDir.open(result["run_dir"])
    assert run.path.parent == tmp_path / "runs"
    lineage = run.lineage()
    ckpt = Path(lineage["checkpoint"])
    assert ckpt.is_relative_to(tmp_path / "shared") and (ckpt / "COMPLETE").is_file()
    assert {p.name for p in ckpt.glob("rng_rank*.json")} == {"rng_rank0.json", "rng_rank1.json"}
    assert run.metrics()["train_steps"] == 6

    # The adapter loads with stock PEFT onto the base and changes its output.
    cfg = run.config()
    base = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32)
    ids = torch.arange(5, 25).unsqueeze(0)
    before = base(ids).logits
    after = PeftModel.from_pretrained(base, str(run.adapter))(ids).logits
    assert not torch.allclose(before, after)


def test_losing_a_node_mid_run_finishes_on_the_rest_from_the_last_checkpoint(cluster_runs):
    from pipelines.artifacts.rundir import RunDir

    loss = cluster_runs["node_loss"]
    assert loss["removed_node"] in loss["nodes_before"]  # the removed node was running a training worker
    run = RunDir.open(loss["run_dir"])
    metrics = run.metrics()
    assert metrics["train_steps"] == 24 and metrics["restarts"] >= 1
    resumed = metrics["resumed_from_step"][0]
    assert resumed % 4 == 0 and 4 <= resumed < 24  # from a registered checkpoint, not step 0
    steps = [m["step"] for m in run.history()]
    assert steps == sorted(set(steps)) and steps[-1] == 24  # no step reported twice
    # The final checkpoint was written by the workers that remained (both ranks, with the marker).
    ckpt = Path(run.lineage()["checkpoint"])
    assert (ckpt / "COMPLETE").is_file()
    assert {p.name for p in ckpt.glob("rng_rank*.json")} == {"rng_rank0.json", "rng_rank1.json"}


if __name__ == "__main__":
    Path(sys.argv[2]).write_text(json.dumps(run_on_cluster(Path(sys.argv[1]))))
