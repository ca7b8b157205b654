"""Which models a server answers for: REFs resolved, named and checked before anything starts.

One base carries every adapter, so every adapter must have been trained on that base (same
content digest) and loaded the same way (4-bit or 16-bit); a merged or fully fine-tuned model is
a whole model and is served alone.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pipelines.artifacts.resolve import ResolvedModel, is_models_uri, parse_models_uri, resolve
from pipelines.core.errors import UserError
from pipelines.data.prompts import template_for


@dataclass(frozen=True)
class ServedModel:
    """One OpenAI `model` id and the registered (or run-directory) model behind it."""

    name: str
    ref: str
    resolved: ResolvedModel
    rank: Optional[int]

    @property
    def follows_alias(self) -> bool:
        return is_models_uri(self.ref) and parse_models_uri(self.ref)[2] is not None

    @property
    def template(self) -> str:
        return template_for(self.resolved.config.data.format)

    def describe(self) -> dict:
        r = self.resolved
        return {"kind": r.kind, "ref": self.ref, "registered_name": r.name, "version": r.version,
                "aliases": list(r.aliases), "rank": self.rank, "digest": r.digest}


@dataclass(frozen=True)
class Catalog:
    """The served set: the base (loaded once) and the models on it, as the server starts."""

    base_path: str
    base_sha256: Optional[str]
    models: tuple[ServedModel, ...]
    tracking_uri: str

    @property
    def merged(self) -> bool:
        """A whole model (merged, or fully fine-tuned) served alone: no base row, no adapters."""
        return self.models[0].resolved.standalone

    @property
    def base_name(self) -> Optional[str]:
        """The base's own model id (None when a whole model is served alone)."""
        return None if self.merged else base_model_id(self.base_path)

    @property
    def base_template(self) -> str:
        """The base gets the prompt template its adapters were trained with, so that asking the
        base and asking an adapter the same question differ only by the adapter."""
        return self.models[0].template


def base_model_id(path: str) -> str:
    """A local base by its folder name, a hub id as it is."""
    p = Path(path).expanduser()
    return p.name if p.is_dir() else path


def adapter_rank(adapter_dir: Path) -> int:
    """The largest LoRA rank of an adapter (r, or a larger per-module rank_pattern value)."""
    cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    return max([int(cfg["r"]), *(int(v) for v in (cfg.get("rank_pattern") or {}).values())])


def uses_dora(adapter_dir: Path) -> bool:
    return bool(json.loads((Path(adapter_dir) / "adapter_config.json").read_text()).get("use_dora"))


def public_names(refs: list[str]) -> list[str]:
    """models:/NAME@ALIAS and models:/NAME/VERSION are served as NAME, a run directory by its folder
    name; when several REFs share a NAME, each keeps its @ALIAS or /VERSION to stay apart."""
    plain = [parse_models_uri(r)[0] if is_models_uri(r) else Path(r).expanduser().resolve().name for r in refs]
    counts = Counter(plain)
    return [r[len("models:/"):] if counts[n] > 1 and is_models_uri(r) else n for n, r in zip(plain, refs)]


def check_on_base(model: ResolvedModel, base_path: str, base_sha256: Optional[str]) -> None:
    """An adapter applies only to the base it was trained on: same content digest (or, for a hub
    id without a digest, the same id)."""
    same = (model.base_sha256 == base_sha256) if (model.base_sha256 and base_sha256) else model.base_path == base_path
    if not same:
        raise UserError(f"{model.ref}: trained on base {model.base_path} (sha256 {str(model.base_sha256)[:12]}), "
                        f"not on the served base {base_path} (sha256 {str(base_sha256)[:12]}); "
                        "serve it from its own `lorapipe serve`")


def check_loading(models: list[ServedModel]) -> None:
    """The base is loaded once, so every adapter must have been trained on it loaded the same way."""
    def how(m: ServedModel) -> tuple:
        c = m.resolved.config.model
        return c.dtype, c.quantization, c.double_quant if c.quantization != "none" else None

    first = how(models[0])
    for m in models[1:]:
        if how(m) != first:
            raise UserError(f"{m.ref} was trained on the base loaded as {how(m)} (dtype, quantization, double quant), "
                            f"{models[0].ref} as {first}: one server loads its base one way")


def check_kinds(models: list[ServedModel]) -> None:
    whole = [m for m in models if m.resolved.standalone]
    if whole and len(models) > 1:
        what = "a fully fine-tuned" if whole[0].resolved.kind == "full" else "a merged"
        raise UserError(f"{whole[0].ref} is {what} model: a whole model is served alone (serve "
                        "-adapter versions to share one base)")
    for m in models:
        if m.resolved.kind == "adapter" and uses_dora(m.resolved.adapter_path):
            raise UserError(f"{m.ref} is a DoRA adapter: PEFT cannot batch DoRA adapters per row; merge it and "
                            "serve the merged model alone")


def build_catalog(refs: list[str], tracking_uri: str) -> Catalog:
    """Resolve every REF (downloading registered versions once) and check they can share one base."""
    from lora import model_content_hash

    if not refs:
        raise UserError("serve needs at least one REF (a run directory, models:/NAME/VERSION or models:/NAME@ALIAS)")
    names = public_names(refs)
    dupes = sorted(n for n, c in Counter(names).items() if c > 1)
    if dupes:
        raise UserError(f"REFs {', '.join(dupes)} name the same model twice; give each model once")
    models = []
    for name, ref in zip(names, refs):
        r = resolve(ref, tracking_uri)
        models.append(ServedModel(name, ref, r, adapter_rank(r.adapter_path) if r.kind == "adapter" else None))
    check_kinds(models)
    first = models[0].resolved
    base_path = str(first.model_path) if first.standalone else first.base_path
    base_sha256 = model_content_hash(base_path) if first.kind == "adapter" else None
    if first.kind == "adapter":
        for m in models:
            check_on_base(m.resolved, base_path, base_sha256)
        check_loading(models)
    catalog = Catalog(base_path, base_sha256, tuple(models), tracking_uri)
    if catalog.base_name in names:
        raise UserError(f"an adapter is named {catalog.base_name!r} like the base; serve it from a registry name")
    return catalog
