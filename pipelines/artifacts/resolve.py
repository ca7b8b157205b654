"""What a model reference names, as local files: a run directory, `models:/NAME/VERSION` or
`models:/NAME@ALIAS`. Later stages (eval, generate, serve) start here and never look at a
training process.

A registered version's artifacts are downloaded once into a cache keyed by the version's source
and content digest, so asking twice costs nothing and a moved alias resolves to the new files.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from pipelines.artifacts.rundir import RunDir
from pipelines.core.errors import UserError
from pipelines.core.files import write_dir_atomic

STANDALONE_KINDS = ("merged", "full")
REGISTERED_KINDS = ("adapter", "merged", "full")
MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[^/@]+)|@(?P<alias>[^/@]+))$")


@dataclass(frozen=True)
class ResolvedModel:
    """A model as later stages load it. kind "adapter": `base_path` (loaded as training saw it:
    4-bit when trained 4-bit) + `adapter_path`; kind "merged": the stand-alone `model_path`;
    kind "full": a fully fine-tuned model, stand-alone at `model_path` like a merged one;
    kind "base": the base alone, loaded as that run loaded it (the "before" row)."""

    ref: str                         # as the user gave it
    kind: str                        # "adapter" | "merged" | "full" | "base"
    config: object                   # the training run's PipelineConfig (model loading settings)
    base_path: str                   # the base model the adapter was trained on
    base_sha256: Optional[str]       # its content hash at training time (None for a hub id)
    digest: str                      # content digest of the weights this reference names
    adapter_path: Optional[Path] = None
    model_path: Optional[Path] = None
    run_dir: Optional[Path] = None
    name: Optional[str] = None       # registered model name
    version: Optional[str] = None
    aliases: tuple[str, ...] = ()
    tags: dict = field(default_factory=dict)

    @property
    def standalone(self) -> bool:
        """A whole model at `model_path` (merged or fully fine-tuned): loads alone, takes no adapter."""
        return self.kind in STANDALONE_KINDS

    @property
    def label(self) -> str:
        return f"{self.name} v{self.version}" if self.name else str(self.run_dir or self.ref)


def is_models_uri(ref: str) -> bool:
    return ref.startswith("models:/")


BASE_PREFIX = "base:"


def resolve(ref: str, tracking_uri: Optional[str] = None) -> ResolvedModel:
    """A run directory, a registry reference, or `base:<either>` (that model's base alone) ->
    ResolvedModel (one-line UserError otherwise)."""
    if ref.startswith(BASE_PREFIX):
        return base_of(resolve(ref.removeprefix(BASE_PREFIX), tracking_uri), ref)
    if is_models_uri(ref):
        return resolve_registered(ref, tracking_uri)
    if Path(ref).expanduser().is_dir():
        return resolve_run_dir(Path(ref).expanduser())
    raise UserError(f"{ref!r} is neither a run directory nor a registry reference "
                    "(models:/NAME/VERSION or models:/NAME@ALIAS; base:<either> for its base alone)")


def resolve_run_dir(path: Path) -> ResolvedModel:
    run = RunDir.open(path)
    cfg, lineage = run.config(), run.lineage()
    full = run.kind == "full"
    return ResolvedModel(ref=str(path), kind=run.kind, config=cfg, base_path=cfg.model.path,
                         base_sha256=lineage.get("base_model_sha256"),
                         digest=run_digest(run.digest_of(run.weights_file), run.kind),
                         adapter_path=None if full else run.adapter, model_path=run.model if full else None,
                         run_dir=run.path)


def run_digest(weights_sha256: str, kind: str) -> str:
    """An adapter is named by its file's SHA-256 (as before full runs existed); a full model apart."""
    return weights_sha256 if kind == "adapter" else f"full:{weights_sha256}"


def base_of(model: ResolvedModel, ref: str) -> ResolvedModel:
    """The base `model` was trained on, loaded as its run loaded it (4-bit when QLoRA)."""
    m = model.config.model
    digest = f"base:{model.base_sha256 or model.base_path}:{m.quantization}:{m.dtype}"
    return ResolvedModel(ref=ref, kind="base", config=model.config, base_path=model.base_path,
                         base_sha256=model.base_sha256, digest=digest)


def parse_models_uri(ref: str) -> tuple[str, Optional[str], Optional[str]]:
    m = MODELS_URI.match(ref)
    if not m:
        raise UserError(f"{ref!r} is not a registry reference; use models:/NAME/VERSION or models:/NAME@ALIAS")
    return m["name"], m["version"], m["alias"]


def registered_version(c, ref: str):
    """The MLflow ModelVersion a models:/ reference names, or a one-line UserError."""
    from mlflow.exceptions import MlflowException

    name, version, alias = parse_models_uri(ref)
    try:
        if alias:
            return c.get_model_version_by_alias(name, alias)
        if not version.isdigit():
            raise UserError(f"{ref}: version {version!r} is not a version number")
        return c.get_model_version(name, version)
    except MlflowException:
        if alias:
            raise UserError(f"{ref}: model {name!r} has no alias {alias!r} (no version holds it)") from None
        raise UserError(f"{ref}: model {name!r} has no version {version}") from None


def resolve_registered(ref: str, tracking_uri: Optional[str] = None) -> ResolvedModel:
    from pipelines.config.load import config_from_yaml_text
    from pipelines.core.defaults import default_tracking_uri
    from pipelines.tracking.runs import client, reachable

    uri = default_tracking_uri(tracking_uri)
    reachable(uri)
    c = client(uri)
    mv = registered_version(c, ref)
    kind = mv.tags.get("lorapipe.kind")
    if kind not in REGISTERED_KINDS:
        raise UserError(f"{ref}: version {mv.version} of {mv.name} was not registered by lorapipe (no lorapipe.kind tag)")
    local = download_version(c, mv, uri)
    config = config_from_yaml_text((local / "run" / "config.yaml").read_text())
    aliases = tuple(sorted(a for a, v in (c.get_registered_model(mv.name).aliases or {}).items() if str(v) == str(mv.version)))
    weights = local / kind
    return ResolvedModel(
        ref=ref, kind=kind, config=config, base_path=mv.tags.get("lorapipe.base_model", config.model.path),
        base_sha256=mv.tags.get("lorapipe.base_model_sha256"), digest=version_digest(mv, kind),
        adapter_path=weights if kind == "adapter" else None, model_path=weights if kind in STANDALONE_KINDS else None,
        name=mv.name, version=str(mv.version), aliases=aliases, tags=dict(mv.tags))


def version_digest(mv, kind: str) -> str:
    """The adapter's SHA-256 names both versions a run registers; the merged one is marked apart.
    A full fine-tuning version is named by its model file's SHA-256 (as its run directory is)."""
    if kind == "full":
        return run_digest(mv.tags.get("lorapipe.model_sha256") or f"{mv.name}-{mv.version}", "full")
    adapter = mv.tags.get("lorapipe.adapter_sha256") or f"{mv.name}-{mv.version}"
    return adapter if kind == "adapter" else f"merged:{adapter}"


def cache_root() -> Path:
    return Path(os.environ.get("LORAPIPE_CACHE", Path.home() / ".cache" / "lorapipe")) / "registry"


def download_version(c, mv, tracking_uri: str) -> Path:
    """<cache>/<digest>/{adapter|merged|full, run/}: the version's weights and its run's config, complete
    or absent (downloaded into a temp folder, renamed into place)."""
    kind = mv.tags.get("lorapipe.kind")
    target = cache_root() / re.sub(r"[^A-Za-z0-9._-]", "_", version_digest(mv, kind))
    run_artifacts = mv.source.rsplit("/", 1)[0]

    def fill(d: Path) -> None:
        from mlflow.artifacts import download_artifacts

        download_artifacts(artifact_uri=mv.source, dst_path=str(d), tracking_uri=tracking_uri)
        download_artifacts(artifact_uri=f"{run_artifacts}/run", dst_path=str(d), tracking_uri=tracking_uri)

    return write_dir_atomic(target, fill, exist_ok=True)


def load_for_inference(model: ResolvedModel, device: str = "cpu"):
    """(model, tokenizer) exactly as the reference means it: the base as training loaded it
    (4-bit NF4 when trained as QLoRA) with the adapter on top, or the merged / fully fine-tuned
    model alone."""
    from lora import load_adapter

    loaded, tokenizer = load_base_for_inference(model, device)
    if model.kind == "adapter":
        loaded = load_adapter(loaded, model.adapter_path)
    loaded.eval()
    return loaded, tokenizer


def load_base_for_inference(model: ResolvedModel, device: str = "cpu"):
    """(model, tokenizer) without the adapter: the base as training loaded it for kind "adapter"
    (where a server puts several adapters on it), the model itself for kinds "merged" and "full",
    the base as its run loaded it for kind "base"."""
    from lora import load_base_model, load_tokenizer

    m = model.config.model
    if model.standalone:
        path = str(model.model_path)
        loaded = load_base_model(path, dtype=m.dtype, device=device, trust_remote_code=m.trust_remote_code)
        return loaded.eval(), load_tokenizer(path, m.trust_remote_code)
    tokenizer = load_tokenizer(model.base_path, m.trust_remote_code, m.revision)
    base = load_base_model(model.base_path, dtype=m.dtype, quantization=m.quantization,
                           double_quant=m.double_quant, quant_storage=m.quant_storage, device=device,
                           trust_remote_code=m.trust_remote_code, revision=m.revision)
    return base.eval(), tokenizer
