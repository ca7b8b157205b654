"""GPU clusters: the same REFs as a Ray Serve LLM application (vLLM multi-LoRA).

Ray Serve LLM loads a LoRA adapter by name from `<dynamic_lora_loading_path>/<name>/` (a cloud
folder) when a request asks for model `<base id>:<name>`. What vLLM needs to know up front comes
from the registry instead of a guess: `max_lora_rank` (the largest registered rank, rounded up to
a rank vLLM accepts) and `max_loras` (how many adapters are served).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from pipelines.core.errors import UserError
from pipelines.core.files import write_dir_atomic, write_text_atomic
from pipelines.serve.app import ServeSettings
from pipelines.serve.catalog import Catalog

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm.config.lora.MaxLoRARanks
VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
CLOUD_SCHEMES = ("s3://", "gs://", "abfss://", "azure://")  # what Ray Serve LLM downloads LoRAs from
LLM_APP = "lorapipe-llm"


def vllm_max_lora_rank(ranks: list[int]) -> int:
    """The smallest rank vLLM accepts that holds every adapter."""
    need = max(ranks)
    fits = [r for r in VLLM_LORA_RANKS if r >= need]
    if not fits:
        raise UserError(f"LoRA rank {need} is above vLLM's largest max_lora_rank ({VLLM_LORA_RANKS[-1]})")
    return fits[0]


def check_lora_path(uri: str) -> str:
    if not uri.startswith(CLOUD_SCHEMES):
        raise UserError(f"--lora-path {uri!r}: Ray Serve LLM loads adapters from cloud storage only; "
                        f"use a folder URI starting with {', '.join(CLOUD_SCHEMES)}")
    return uri.rstrip("/")


def engine_kwargs(catalog: Catalog) -> dict:
    m = catalog.models[0].resolved.config.model
    kwargs = {"dtype": VLLM_DTYPES[m.dtype]}
    if catalog.merged:
        return kwargs
    ranks = [s.rank for s in catalog.models]
    kwargs.update(enable_lora=True, max_lora_rank=vllm_max_lora_rank(ranks), max_loras=len(ranks))
    if m.quantization != "none":
        kwargs["quantization"] = "bitsandbytes"  # the 4-bit base the adapters were trained on (QLoRA)
    return kwargs


def llm_config(catalog: Catalog, lora_path: str, settings: ServeSettings) -> dict:
    """One LLMConfig (ray.serve.llm) as a plain dict: the base, and the adapters under lora_path."""
    if catalog.merged:
        model = catalog.models[0]
        loading = {"model_id": model.name, "model_source": str(catalog.base_path)}
    else:
        loading = {"model_id": catalog.base_name, "model_source": catalog.base_path}
    cfg = {"model_loading_config": loading, "engine_kwargs": engine_kwargs(catalog),
           "deployment_config": {"max_ongoing_requests": settings.max_ongoing_requests,
                                 "max_queued_requests": settings.max_queued_requests}}
    if not catalog.merged:
        cfg["lora_config"] = {"dynamic_lora_loading_path": lora_path, "max_num_adapters_per_replica": len(catalog.models)}
    return cfg


def serve_config(catalog: Catalog, lora_path: str, settings: ServeSettings) -> dict:
    """A Ray Serve config file (`serve run FILE` / `serve deploy FILE` / a RayService's serveConfigV2)."""
    return {
        "http_options": {"host": settings.host, "port": settings.port, "request_timeout_s": settings.request_timeout_s},
        "applications": [{"name": LLM_APP, "route_prefix": "/", "import_path": "ray.serve.llm:build_openai_app",
                          "args": {"llm_configs": [llm_config(catalog, lora_path, settings)]}}],
    }


def stage_adapters(catalog: Catalog, out: Path) -> Path:
    """<out>/<served name>/ holds each adapter (PEFT files): the folder to copy to --lora-path."""
    def fill(d: Path) -> None:
        for m in catalog.models:
            shutil.copytree(m.resolved.adapter_path, d / m.name)

    if out.exists():
        shutil.rmtree(out)
    return write_dir_atomic(out, fill)


def write_llm_config(catalog: Catalog, lora_path: str, settings: ServeSettings, out: Path) -> tuple[Path, Path]:
    """The Serve config YAML at `out` and the staged adapters beside it (<out stem>.loras/)."""
    lora_path = check_lora_path(lora_path) if not catalog.merged else lora_path
    staged = stage_adapters(catalog, out.with_suffix(".loras")) if not catalog.merged else None
    write_text_atomic(out, yaml.safe_dump(serve_config(catalog, lora_path, settings), sort_keys=False))
    return out, staged


def upload_adapters(staged: Path, lora_path: str) -> None:
    """Copy the staged adapters to the cloud folder Ray Serve LLM loads them from."""
    from pyarrow import fs

    fs.copy_files(str(staged), lora_path)


def build_llm_app(config: dict):
    """The Ray Serve LLM application of a written config (needs vLLM: GPU clusters)."""
    try:
        from ray.serve.llm import build_openai_app
    except ImportError as e:
        raise UserError(f"--engine vllm --run needs Ray Serve LLM with vLLM (pip install 'ray[llm]'): "
                        f"{str(e).splitlines()[0]}") from None
    return build_openai_app(config["applications"][0]["args"])
