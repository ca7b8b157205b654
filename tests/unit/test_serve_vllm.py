"""`lorapipe serve --engine vllm`: the Ray Serve LLM config for registered adapters, validated
against Ray Serve LLM's own pydantic models (LLMConfig, LoraConfig; they import without vLLM) and
Serve's config schema; and the KubeRay RayService for the PEFT engine, validated the same way.
Nothing here deploys: there is no GPU or vLLM on this machine.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipelines.artifacts.resolve import ResolvedModel
from pipelines.config.load import load_config
from pipelines.core.errors import UserError
from pipelines.serve.app import ServeSettings
from pipelines.serve.catalog import Catalog, ServedModel, adapter_rank
from pipelines.serve.vllm import check_lora_path, serve_config, vllm_max_lora_rank, write_llm_config

ROOT = Path(__file__).resolve().parents[2]


def _adapter(tmp: Path, name: str, r: int, rank_pattern: dict | None = None) -> Path:
    d = tmp / name
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"r": r, "rank_pattern": rank_pattern or {}, "use_dora": False}))
    (d / "adapter_model.safetensors").write_bytes(b"weights")
    return d


def _catalog(tmp: Path, quantization: str = "nf4") -> Catalog:
    cfg = load_config(ROOT / "configs/tiny-cpu.yaml", [f"model.quantization={quantization}"])
    base = tmp / "base"
    base.mkdir(exist_ok=True)  # a local base is served under its folder name
    models = []
    for name, r, pattern in (("reverse-adapter", 8, None), ("sort-adapter", 16, {"q_proj": 24})):
        path = _adapter(tmp, name, r, pattern)
        resolved = ResolvedModel(ref=f"models:/{name}@champion", kind="adapter", config=cfg, base_path=str(base),
                                 base_sha256="ab", digest="cd", adapter_path=path, name=name, version="3")
        models.append(ServedModel(name, resolved.ref, resolved, adapter_rank(path)))
    return Catalog(str(base), "ab", tuple(models), "sqlite:///mlflow.db")


def test_max_lora_rank_is_the_largest_registered_rank_rounded_up_to_a_vllm_rank():
    assert vllm_max_lora_rank([8, 4]) == 8
    assert vllm_max_lora_rank([9]) == 16 and vllm_max_lora_rank([24, 16]) == 32 and vllm_max_lora_rank([300]) == 320
    with pytest.raises(UserError, match="above vLLM's largest"):
        vllm_max_lora_rank([600])


def test_lora_path_must_be_cloud_storage():
    assert check_lora_path("s3://bucket/loras/") == "s3://bucket/loras"
    with pytest.raises(UserError, match="cloud storage only"):
        check_lora_path("/mnt/shared/loras")


def test_written_config_validates_against_ray_serve_llm_schema(tmp_path):
    from ray.llm._internal.serve.core.configs.llm_config import LLMConfig, LoraConfig  # = ray.serve.llm's
    from ray.serve.schema import ServeDeploySchema

    catalog = _catalog(tmp_path)
    out, staged = write_llm_config(catalog, "s3://bucket/loras", ServeSettings(port=8100), tmp_path / "llm.yaml")
    spec = yaml.safe_load(out.read_text())
    ServeDeploySchema.model_validate(spec)
    app = spec["applications"][0]
    assert app["import_path"] == "ray.serve.llm:build_openai_app"
    llm = LLMConfig.model_validate(app["args"]["llm_configs"][0])
    lora = llm.lora_config if isinstance(llm.lora_config, LoraConfig) else LoraConfig.model_validate(llm.lora_config)
    assert lora.dynamic_lora_loading_path == "s3://bucket/loras" and lora.max_num_adapters_per_replica == 2
    assert llm.model_loading_config.model_source == str(tmp_path / "base") and llm.model_id == "base"
    kw = llm.engine_kwargs
    assert kw["enable_lora"] and kw["max_lora_rank"] == 32 and kw["max_loras"] == 2  # rank_pattern's 24 -> 32
    assert kw["quantization"] == "bitsandbytes" and kw["dtype"] == "float32"
    # The staged folder is what --lora-path must hold: <name>/ with the PEFT files, per adapter.
    assert sorted(p.name for p in staged.iterdir()) == ["reverse-adapter", "sort-adapter"]
    assert (staged / "sort-adapter" / "adapter_config.json").is_file()


def test_a_16bit_base_has_no_quantization_and_a_broken_config_is_rejected_by_rays_schema(tmp_path):
    from pydantic import ValidationError
    from ray.llm._internal.serve.core.configs.llm_config import LLMConfig

    config = serve_config(_catalog(tmp_path, quantization="none"), "gs://b/l", ServeSettings())
    llm = config["applications"][0]["args"]["llm_configs"][0]
    assert "quantization" not in llm["engine_kwargs"]
    LLMConfig.model_validate(llm)
    with pytest.raises(ValidationError):
        LLMConfig.model_validate({**llm, "lora_config": {"dynamic_lora_loading_path": "/local/dir"}})


def test_rayservice_manifest_is_a_kuberay_v1_rayservice_for_the_peft_app():
    from ray.serve.schema import ServeDeploySchema

    from pipelines.serve.app import app_builder

    doc = yaml.safe_load((ROOT / "infra/kuberay/rayservice.yaml").read_text())
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayService")
    serve_cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_cfg)
    app = serve_cfg["applications"][0]
    module, attr = app["import_path"].split(":")
    assert (module, attr) == ("pipelines.serve.app", "app_builder") and callable(app_builder)
    settings = {k: v for k, v in app["args"].items() if k not in ("refs", "tracking_uri")}
    ServeSettings(**settings)  # every arg is a setting the builder accepts
    assert all(r.startswith("models:/") for r in app["args"]["refs"])
    cluster = yaml.safe_load((ROOT / "infra/kuberay/raycluster.yaml").read_text())["spec"]
    rc = doc["spec"]["rayClusterConfig"]
    assert rc["rayVersion"] == cluster["rayVersion"] and rc["authOptions"] == cluster["authOptions"]
    image = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    pods = [rc["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in rc["workerGroupSpecs"]]
    for pod in pods:
        c = pod["containers"][0]
        assert c["image"] == image
        assert {"name": "shared", "mountPath": "/mnt/shared"} in c["volumeMounts"]
        assert any(e["name"] == "MLFLOW_TRACKING_URI" for e in c["env"])
