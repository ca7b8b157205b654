"""Full fine-tuning (method=full): every weight trains in the same worker loop under DeepSpeed
ZeRO-2 and ZeRO-3 (real local Ray, 2 CPU workers, the tiny builtin Llama), and the run directory
holds a whole model (model/) that later stages read like a merged one: eval (resolve + load),
registry (one NAME-full version, gated promotion), serve (served alone), merge (refused)."""
from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.integration

SUITE = {"sets": [{"name": "reverse", "path": "builtin:demo-tasks", "task": "reverse", "limit": 16, "max_seq_len": 96,
                   "metrics": ["loss"]}],
         "primary": {"metric": "reverse/loss", "mode": "min"}}
IDS = torch.arange(5, 25).unsqueeze(0)


@pytest.fixture(scope="module")
def private_dirs(tmp_path_factory):
    """Private asset and download-cache folders for this module."""
    root = tmp_path_factory.mktemp("fullft")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAPIPE_HOME", str(root / "home"))
        mp.setenv("LORAPIPE_CACHE", str(root / "cache"))
        yield root


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def _stock(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def test_full_run_dir_resolves_loads_registers_and_serves_alone(private_dirs, tmp_path):
    """A full run directory (trained in this process) through every later stage, without Ray."""
    import mlflow
    from runkit import write_full_run

    from pipelines.artifacts.resolve import load_for_inference, resolve
    from pipelines.config.eval_suite import EvalSuite
    from pipelines.core.errors import UserError
    from pipelines.registry.merge import merge_run
    from pipelines.registry.promote import promote
    from pipelines.registry.register import register_run
    from pipelines.serve.catalog import build_catalog

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = write_full_run(tmp_path, "full-a", [f"mlflow.tracking_uri={uri}", "registry.name=fulltest"], steps=4)
    assert run.kind == "full" and not run.adapter.exists() and (run.model / "model.safetensors").is_file()

    # eval's view: a stand-alone model at run/model, loaded as stock transformers loads it.
    model = resolve(str(run.path))
    assert model.kind == "full" and model.standalone and model.model_path == run.model and model.adapter_path is None
    loaded, tokenizer = load_for_inference(model)
    assert torch.equal(_logits(loaded), _logits(_stock(run.model)))
    assert tokenizer.get_vocab() == _stock_tokenizer(run.model).get_vocab()
    base = resolve(f"base:{run.path}")  # the base the run started from, unquantized as it trained
    assert base.kind == "base" and base.config.model.quantization == "none"
    base_loaded, _ = load_for_inference(base)
    assert not torch.allclose(_logits(base_loaded), _logits(loaded), atol=1e-4)

    # registry: one version of NAME-full, lineage and digest tags, the gate suite; idempotent.
    suite = EvalSuite.model_validate(SUITE)
    reg = register_run(run.path, tracking_uri=uri, suite=suite)
    assert reg.created and reg.versions() == {"fulltest-full": "1"}
    assert register_run(run.path, tracking_uri=uri).versions() == {"fulltest-full": "1"}
    c = mlflow.MlflowClient(uri)
    assert [m.name for m in c.search_registered_models()] == ["fulltest-full"]
    mv = c.get_model_version("fulltest-full", "1")
    assert mv.tags["lorapipe.kind"] == "full" and mv.tags["lorapipe.base_model"] == run.lineage()["base_model"]
    assert mv.tags["lorapipe.model_sha256"] == run.digest_of("model/model.safetensors")
    assert any(k.startswith("lorapipe.eval.") for k in mv.tags)  # evaluated on the gate suite at registration
    registered = resolve("models:/fulltest-full/1", uri)
    assert registered.kind == "full" and (registered.model_path / "model.safetensors").is_file()
    assert torch.equal(_logits(load_for_inference(registered)[0]), _logits(loaded))
    assert promote("fulltest-full", "1", "champion", tracking_uri=uri).promoted

    # A second full run goes through the same gate against the champion.
    other = write_full_run(tmp_path, "full-b", [f"mlflow.tracking_uri={uri}", "registry.name=fulltest"], steps=1)
    assert register_run(other.path, tracking_uri=uri).versions() == {"fulltest-full": "2"}
    gated = promote("fulltest-full", "2", "champion", tracking_uri=uri)
    assert gated.rows and len(gated.rows) == 2  # compared on the suite, candidate and holder

    # serve: a whole model, served alone; merge: nothing to merge.
    catalog = build_catalog([str(run.path)], uri)
    assert catalog.merged and catalog.base_name is None and catalog.base_path == str(run.model)
    with pytest.raises(UserError, match="fully fine-tuned model: a whole model is served alone"):
        build_catalog([str(run.path), str(other.path)], uri)
    with pytest.raises(UserError, match="full fine-tuning run"):
        merge_run(run.path, tmp_path / "merged")


def _stock_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


@pytest.mark.parametrize("stage", [2, 3])
def test_full_finetune_under_zero(private_dirs, ray_local, tiny_config, stage):
    """Every weight trains on 2 workers; run/model loads with stock transformers, differs from the
    base in every tensor, and metrics.json counts every parameter as trainable."""
    from lora import load_base_model
    from pipelines.artifacts.rundir import REQUIRED_METRICS, RunDir
    from pipelines.train.driver import train

    cfg = tiny_config("method=full", "model.quantization=none", f"deepspeed.stage={stage}", "train.lr=2e-3",
                      "mlflow.enabled=false")
    run = RunDir.open(train(cfg, progress=False).path)
    run.verify_digests()
    assert run.kind == "full" and not run.adapter.exists()
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(run.model))
    history = run.history()
    assert history[-1]["train_loss"] < history[0]["train_loss"] - 0.05, history

    metrics = run.metrics()
    assert all(metrics[k] == metrics[k] for k in REQUIRED_METRICS)  # present, not NaN
    base = load_base_model(run.config().model.path, dtype="fp32")  # the builtin, resolved to its folder
    n = sum(p.numel() for p in base.parameters())
    assert metrics["trainable_params"] == metrics["total_params"] == n
    assert metrics["train_seconds"] > 0 and metrics["train_steps"] == 12

    trained = _stock(run.model)
    before, after = base.state_dict(), trained.state_dict()
    assert set(before) == set(after) and all(before[k].shape == after[k].shape for k in before)
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, f"{len(unchanged)} of {len(before)} tensors never trained: {unchanged[:3]}"
    assert not torch.allclose(_logits(base), _logits(trained), atol=1e-4)
