"""Registry against a real `mlflow server` (sqlite backend, local artifact root) on 127.0.0.1.

Run directories are produced in-process (a few real LoRA steps on the tiny base, written with the
same writer training uses): the registry reads only the run directory, so Ray is not needed here.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from procs import MlflowServer, free_port
from runkit import write_trained_run

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    yield server.uri
    server.stop()


def make_run_dir(tmp: Path, name: str, *, quantization: str, steps: int, uri: str, seed: int = 0):
    """A real adapter trained `steps` steps on the tiny base and evaluated, as a contract run dir."""
    return write_trained_run(tmp, name, [f"model.quantization={quantization}", f"mlflow.tracking_uri={uri}",
                                         "data.path=builtin:demo-tasks", "data.max_examples=200", "registry.name=regtest"],
                             steps=steps, seed=seed)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_register_load_back_promote(mlflow_server, tmp_path, capsys, monkeypatch):
    import mlflow
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lora import load_base_model
    from pipelines.cli import main
    from pipelines.registry.promote import promote
    from pipelines.registry.register import register_run

    uri = mlflow_server
    weak = make_run_dir(tmp_path, "weak", quantization="nf4", steps=2, uri=uri)
    strong = make_run_dir(tmp_path, "strong", quantization="nf4", steps=25, uri=uri)
    assert strong.metrics()["eval_loss"] < weak.metrics()["eval_loss"]

    reg = register_run(strong.path, tracking_uri=uri)
    assert reg.created and reg.name == "regtest"
    again = register_run(strong.path, tracking_uri=uri)  # idempotent: no duplicate versions
    assert not again.created and (again.adapter_version, again.merged_version) == (reg.adapter_version, reg.merged_version)
    client = mlflow.MlflowClient(uri)
    assert len(client.search_model_versions("name='regtest-merged'")) == 1

    # Load back with stock MLflow + transformers/PEFT; logits equal the run directory's model.
    # Through the environment, undone after the test (mlflow.set_tracking_uri would stay set for
    # every later module's default client).
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    merged_dir = mlflow.artifacts.download_artifacts(f"models:/regtest-merged/{reg.merged_version}")
    adapter_dir = mlflow.artifacts.download_artifacts(f"models:/regtest-adapter/{reg.adapter_version}")
    cfg = strong.config()
    ids = torch.arange(4, 30).unsqueeze(0)
    trained = PeftModel.from_pretrained(load_base_model(cfg.model.path, dtype="fp32", quantization="nf4"), str(strong.adapter))
    reference = _logits(trained, ids)
    base = load_base_model(cfg.model.path, dtype="fp32", quantization="nf4")
    from_registry_adapter = PeftModel.from_pretrained(base, adapter_dir)
    assert torch.equal(_logits(from_registry_adapter, ids), reference)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    assert (_logits(merged, ids) - reference).abs().max() < 1e-4
    mv = client.get_model_version("regtest-merged", reg.merged_version)
    assert mv.tags["lorapipe.merge_method"] == "dequantize-then-merge"
    assert float(mv.tags["lorapipe.merge_max_abs_logit_diff"]) < 1e-4
    assert float(mv.tags["lorapipe.metric.eval_loss"]) == pytest.approx(strong.metrics()["eval_loss"])

    # Promotion: first needs no comparison; a worse version is refused showing both values.
    first = promote("regtest-merged", reg.merged_version, "champion", tracking_uri=uri)
    assert first.promoted
    worse = register_run(weak.path, tracking_uri=uri)
    rc = main(["promote", "regtest-merged", worse.merged_version, "--tracking-uri", uri])
    err = capsys.readouterr().err
    # Judged on the model's gate suite (here the default: rows of the run's own data), not on
    # each run's own eval split.
    assert rc == 1 and "refused" in err and "data/loss" in err
    assert client.get_model_version_by_alias("regtest-merged", "champion").version == str(reg.merged_version)
    # Forced promotion records who/when/why; moving back to the better version is the rollback.
    rc = main(["promote", "regtest-merged", worse.merged_version, "--force", "--reason", "canary", "--tracking-uri", uri])
    assert rc == 0
    forced = client.get_model_version("regtest-merged", worse.merged_version)
    assert forced.tags["lorapipe.forced.champion.reason"] == "canary" and forced.tags["lorapipe.forced.champion.by"]
    assert client.get_model_version_by_alias("regtest-merged", "champion").version == str(worse.merged_version)
    # Now the strong version beats the (forced, worse) champion: the gate lets it through.
    assert promote("regtest-merged", reg.merged_version, "champion", tracking_uri=uri).promoted
    assert client.get_model_version_by_alias("regtest-merged", "champion").version == str(reg.merged_version)


def test_merge_parity_16bit_and_4bit(tmp_path):
    from pipelines.registry.merge import merge_run

    for quant, tol in (("none", 1e-5), ("nf4", 1e-4)):
        run = make_run_dir(tmp_path, f"run-{quant}", quantization=quant, steps=3, uri="sqlite:///unused.db")
        report = merge_run(run.path, tmp_path / f"merged-{quant}")
        assert report["max_abs_logit_diff"] < tol, report
        assert report["method"] == ("dequantize-then-merge" if quant == "nf4" else "merge")
        assert (tmp_path / f"merged-{quant}" / "model.safetensors").is_file()


def test_bad_registry_input_is_one_line(tmp_path, mlflow_server, capsys):
    from pipelines.cli import main

    cases = [
        (["register", str(tmp_path / "nope")], "run directory not found"),
        (["promote", "regtest-merged", "99", "--tracking-uri", mlflow_server], "has no version 99"),
        (["promote", "regtest-merged", "abc", "--tracking-uri", mlflow_server], "not a version number"),
        (["promote", "bad/name", "1", "--tracking-uri", mlflow_server], "is not allowed"),
        (["promote", "x", "1", "--tracking-uri", f"http://127.0.0.1:{free_port()}"], "unreachable"),
    ]
    # A run directory whose adapter changed after training: refused before anything is uploaded.
    tampered = make_run_dir(tmp_path, "tampered", quantization="none", steps=1, uri=mlflow_server)
    weights = tampered.adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + bytes(8))
    cases.append((["register", str(tampered.path), "--name", "tampered", "--tracking-uri", mlflow_server],
                  "does not match its recorded SHA-256"))
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], (argv, err)
    from mlflow.tracking import MlflowClient

    assert not [m for m in MlflowClient(mlflow_server).search_registered_models() if m.name.startswith("tampered")]
