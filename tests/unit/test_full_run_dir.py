"""A full fine-tuning run's files: the run directory's two kinds (adapter/ or model/), the check
of a saved whole model (the ZeRO-3 empty-save failure), and what metrics.json carries for the
method comparison (trainable/total parameters, train seconds)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pipelines.artifacts.rundir import RunDir, contract, write_run_dir
from pipelines.core.errors import UserError

SHAPES = {"model.embed_tokens.weight": (10, 4), "lm_head.weight": (10, 4)}


def model_folder(root: Path, tensors: dict) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file(tensors, str(root / "model.safetensors"))
    return root


def adapter_folder(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "adapter_config.json").write_text("{}")
    save_file({"a.lora_A.weight": torch.ones(2, 4)}, str(root / "adapter_model.safetensors"))
    return root


def write(tmp: Path, name: str, src: Path, kind: str) -> RunDir:
    return write_run_dir(tmp / name, config_yaml="name: x\n", weights_src=src, kind=kind,
                         metrics={"train_loss": 1.0}, lineage={"base_model": "b"})


def test_a_full_run_holds_model_instead_of_adapter(tmp_path):
    src = model_folder(tmp_path / "src", {k: torch.ones(s) for k, s in SHAPES.items()})
    run = RunDir.open(write(tmp_path, "full", src, "full").path)
    assert run.kind == "full" and run.model.is_dir() and not run.adapter.exists()
    assert run.weights == run.model and run.weights_file == "model/model.safetensors"
    assert run.digest_of(run.weights_file) == json.loads((run.path / "digests.json").read_text())[run.weights_file]
    assert "model/model.safetensors" in contract("full") and "adapter/adapter_config.json" not in contract("full")


def test_an_adapter_run_is_unchanged(tmp_path):
    run = RunDir.open(write(tmp_path, "lora", adapter_folder(tmp_path / "src"), "adapter").path)
    assert run.kind == "adapter" and run.weights == run.adapter
    assert run.weights_file == "adapter/adapter_model.safetensors"
    legacy = write_run_dir(tmp_path / "legacy", config_yaml="", adapter_src=run.adapter, metrics={}, lineage={})
    assert legacy.kind == "adapter"  # the older keyword still writes an adapter run


def test_a_full_run_without_its_weights_file_is_refused(tmp_path):
    src = model_folder(tmp_path / "src", {k: torch.ones(s) for k, s in SHAPES.items()})
    run = write(tmp_path, "full", src, "full")
    (run.model / "model.safetensors").unlink()
    with pytest.raises(UserError, match="missing model/model.safetensors"):
        RunDir.open(run.path)


def test_unknown_run_kind_is_refused(tmp_path):
    with pytest.raises(ValueError, match="run kind 'merged'"):
        write(tmp_path, "x", tmp_path, "merged")


def test_verify_model_files_refuses_empty_unknown_and_misshapen_tensors(tmp_path):
    from lora import verify_model_files

    good = model_folder(tmp_path / "good", {k: torch.ones(s) for k, s in SHAPES.items()})
    assert verify_model_files(good, SHAPES) == {"tensors": 2, "parameters": 80}
    empty = model_folder(tmp_path / "empty", {"model.embed_tokens.weight": torch.ones(0), "lm_head.weight": torch.ones(10, 4)})
    with pytest.raises(RuntimeError, match="model.embed_tokens.weight is empty .*not gathered"):
        verify_model_files(empty, SHAPES)
    wrong = model_folder(tmp_path / "wrong", {"model.embed_tokens.weight": torch.ones(10, 5)})
    with pytest.raises(RuntimeError, match=r"has shape \(10, 5\), expected \(10, 4\)"):
        verify_model_files(wrong, SHAPES)
    stray = model_folder(tmp_path / "stray", {"other.weight": torch.ones(1)})
    with pytest.raises(RuntimeError, match="other.weight is not a tensor of the trained model"):
        verify_model_files(stray, SHAPES)


def test_make_fully_trainable_unfreezes_every_parameter():
    from lora import make_fully_trainable
    from lora.full import state_dict_shapes
    from lora.tiny import build_tiny_llama

    model = build_tiny_llama(32, hidden=16, layers=2, heads=2)
    for p in model.parameters():
        p.requires_grad_(False)
    make_fully_trainable(model, gradient_checkpointing=True)
    assert all(p.requires_grad for p in model.parameters()) and model.is_activation_checkpointing
    assert state_dict_shapes(model)["lm_head.weight"] == (32, 16)


def test_metrics_json_carries_the_method_comparison_figures():
    from pipelines.train.driver import final_metrics

    report = {"step": 2, "train_loss": 1.0, "eval_loss": 2.0, "eval_perplexity": 7.4, "peak_memory_bytes": 5,
              "trainable_params": 40, "total_params": 1000}
    state = {"history": [report], "tokens": 100, "train_seconds": 4.0, "step": 2, "slots": 100}
    m = final_metrics(state)
    assert (m["trainable_params"], m["total_params"], m["train_seconds"]) == (40, 1000, 4.0)
    assert m["tokens_per_s"] == pytest.approx(25.0)
