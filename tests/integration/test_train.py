"""Real local Ray, 2 CPU workers, real DeepSpeed ZeRO-2/3 on a real 4-bit (bitsandbytes) base."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

pytestmark = pytest.mark.integration


def _assert_contract(run):
    from pipelines.artifacts.rundir import REQUIRED_METRICS, RunDir

    RunDir.open(run.path)  # marker + contract files present
    run.verify_digests()
    metrics = run.metrics()
    for key in REQUIRED_METRICS:
        assert key in metrics and metrics[key] == metrics[key], key  # present, not NaN
    assert metrics["train_steps"] == 12
    assert metrics["tokens_per_s"] > 0 and metrics["peak_memory_bytes"] > 0 and metrics["train_seconds"] > 0
    # The method comparison's figures: an adapter is a small share of a (4-bit, counted unpacked) tiny base.
    assert 0 < metrics["trainable_params"] < 0.2 * metrics["total_params"]
    lineage = run.lineage()
    for key in ("base_model", "base_model_sha256", "dataset_fingerprint", "lorapipe_version", "seed"):
        assert lineage[key] is not None and lineage[key] != "", key
    cfg = run.config()  # the resolved config re-validates
    assert cfg.run.name == run.path.name


def _stock_peft_loads(run):
    """The adapter loads with stock PEFT onto the base as trained and changes its output."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = run.config()
    base = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32)
    ids = torch.arange(5, 25).unsqueeze(0)
    before = base(ids).logits
    model = PeftModel.from_pretrained(base, str(run.adapter))
    after = model(ids).logits
    assert not torch.allclose(before, after), "adapter has no effect"


@pytest.mark.parametrize("stage,extra", [
    (2, []),
    # ZeRO-3 + 4-bit: storage dtype == load dtype. The micro batch left to the plan: on a CPU worker's
    # RAM share the whole per-worker batch fits, so the run trains as the stage-2 one does (8 x 1).
    (3, ["model.quant_storage=fp32", "train.micro_batch_size=auto", "train.global_batch_size=16",
         "train.grad_accum=null"]),
])
def test_qlora_trains_under_deepspeed(ray_local, tiny_config, stage, extra):
    from pipelines.train.driver import train

    cfg = tiny_config(f"deepspeed.stage={stage}", *extra)
    run = train(cfg, progress=False)
    _assert_contract(run)
    history = [json.loads(line) for line in (run.path / "history.jsonl").read_text().splitlines()]
    # 120 rows -> ~54 per worker -> 6 micro batches an epoch: batches repeat, loss must fall.
    assert history[-1]["train_loss"] < history[0]["train_loss"] - 0.05, history
    assert history[-1]["eval_loss"] < history[1]["eval_loss"] + 1e-9 or history[-1]["eval_loss"] < 4.2
    saved = yaml.safe_load((run.path / "config.yaml").read_text())
    assert saved["deepspeed"]["stage"] == stage and saved["model"]["quantization"] == "nf4"
    # The run directory records the micro batch the workers stepped with, never `auto`.
    assert (saved["train"]["micro_batch_size"], saved["train"]["grad_accum"], run.config().global_batch_size()) == (8, 1, 16)
    _stock_peft_loads(run)
    # MLflow: the run exists, finished, with metrics logged by rank 0.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(cfg.tracking_uri())
    mlrun = client.get_run(run.lineage()["mlflow_run_id"])
    assert mlrun.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(mlrun.info.run_id, "train_loss")] == [3, 6, 9, 12]
