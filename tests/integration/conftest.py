"""Integration fixtures: a real local Ray per module (multi-node tests start their own cluster),
a per-test sqlite MLflow store, one in-process DeepSpeed process group per session."""
from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="module")
def ray_local():
    import ray

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # 2 cores here: logical over-subscription lets a driver/trial and two 1-CPU workers coexist.
    # Dashboard on: Ray Train's placement-group cleaner needs the state API it serves (see ensure_ray).
    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False,
             configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def deepspeed_world1():
    """One process group (gloo, world size 1) for DeepSpeed engines built in the test process,
    created once per session: DeepSpeed caches its groups, so an init after a destroy leaves it
    holding dead ones. Yields the env an engine build reads (LOCAL_RANK, ...): set it meanwhile."""
    import deepspeed
    import torch
    from procs import free_port

    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0"}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        deepspeed.init_distributed(dist_backend="gloo")
    yield env
    torch.distributed.destroy_process_group()


@pytest.fixture
def tiny_config(tmp_path):
    """The tiny CPU preset pointed at tmp_path for outputs and MLflow, small and fast."""
    from pipelines.config.load import load_config

    def make(*overrides: str):
        return load_config("configs/tiny-cpu.yaml", [
            f"run.output_dir={tmp_path / 'runs'}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "data.max_examples=120", "train.max_steps=12", "train.eval_every=6", "train.report_every=3",
            "train.checkpoint_every=6", "train.warmup_steps=0", "train.lr=0.01", *overrides])

    return make
