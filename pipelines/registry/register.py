"""MLflow registry: log a run directory's adapter and merged model and register both as versions.

Everything here reads only the run directory. The registry only ever sees complete artifacts:
the merge is finished and verified on local disk before anything is uploaded, and a version
is created only after its artifacts are logged.
"""
from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pipelines.artifacts.rundir import RunDir
from pipelines.core.errors import UserError
from pipelines.tracking.auth import authorize_registration, record_protected_aliases
from pipelines.tracking.runs import client as mlflow_client
from pipelines.tracking.runs import reachable, start_run, with_retries

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
GATE_TAGS = ("lorapipe.gate_metric", "lorapipe.gate_mode", "lorapipe.gate_margin")


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise UserError(f"registered model name {name!r} is not allowed: use letters, digits, '.', '_' or '-' "
                        "(starting with a letter or digit, at most 200 characters)")
    return name


def _run_exists(c, run_id: Optional[str]) -> bool:
    if not run_id:
        return False
    try:
        c.get_run(run_id)
        return True
    except Exception:
        return False


def lineage_tags(lineage: dict) -> dict[str, str]:
    keys = ("base_model", "base_model_sha256", "dataset_fingerprint", "lorapipe_version", "git_commit",
            "tune_trial_id", "seed")
    return {f"lorapipe.{k}": str(lineage.get(k)) for k in keys if lineage.get(k) is not None}


def metric_tags(metrics: dict, prefix: str = "lorapipe.metric.") -> dict[str, str]:
    return {f"{prefix}{k}": repr(float(v)) for k, v in metrics.items() if isinstance(v, (int, float))}


def _find_versions(c, name: str, digest: str) -> list:
    """Versions of `name` already registered from this exact adapter (idempotent register)."""
    from mlflow.exceptions import MlflowException

    try:
        found = c.search_model_versions(f"name='{name}'")
    except MlflowException:
        return []
    return [v for v in found if v.tags.get("lorapipe.adapter_sha256") == digest]


def _ensure_registered_model(c, name: str, description: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        c.get_registered_model(name)
    except MlflowException:
        c.create_registered_model(name, description=description)


@dataclass
class Registered:
    name: str
    adapter_version: str
    merged_version: str
    run_id: str
    created: bool


def register_run(run_dir: str | Path, name: Optional[str] = None, tracking_uri: Optional[str] = None) -> Registered:
    from pipelines.registry.merge import merge_run

    run = RunDir.open(run_dir)
    run.verify_digests()
    cfg, metrics, lineage = run.config(), run.metrics(), run.lineage()
    name = check_name(name or cfg.registry_name())
    uri = tracking_uri or cfg.tracking_uri()
    reachable(uri)
    c = mlflow_client(uri)
    authorize_registration(uri, c, cfg.mlflow.experiment, (f"{name}-adapter", f"{name}-merged"))  # before any upload
    digest = run.digest_of("adapter/adapter_model.safetensors")

    existing_a, existing_m = _find_versions(c, f"{name}-adapter", digest), _find_versions(c, f"{name}-merged", digest)
    if existing_a and existing_m:
        return Registered(name, existing_a[0].version, existing_m[0].version, existing_m[0].run_id, created=False)
    run_id = lineage.get("mlflow_run_id")
    if not _run_exists(c, run_id):
        run_id = start_run(uri, cfg.mlflow.experiment, run.path.name, cfg.model_dump(mode="json"),
                           {"lorapipe.registered_from": str(run.path)})

    with tempfile.TemporaryDirectory(prefix="lorapipe-merge-") as tmp:
        merged_dir = Path(tmp) / "merged"
        report = merge_run(run.path, merged_dir)  # complete and verified before any upload
        tags = {**lineage_tags(lineage), "lorapipe.run_dir": str(run.path), "lorapipe.adapter_sha256": digest}
        for k, v in tags.items():
            with_retries(lambda: c.set_tag(run_id, k, v), what="MLflow set_tag")
        with_retries(lambda: c.log_artifacts(run_id, str(run.adapter), "adapter"), what="upload adapter")
        with_retries(lambda: c.log_artifacts(run_id, str(merged_dir), "merged"), what="upload merged model")
        for f in ("config.yaml", "metrics.json", "lineage.json"):
            with_retries(lambda: c.log_artifact(run_id, str(run.path / f), "run"), what=f"upload {f}")
    artifact_uri = c.get_run(run_id).info.artifact_uri
    gate = {"lorapipe.gate_metric": cfg.registry.gate_metric, "lorapipe.gate_mode": cfg.registry.gate_mode,
            "lorapipe.gate_margin": repr(cfg.registry.margin)}
    parity = {"lorapipe.merge_method": report["method"],
              "lorapipe.merge_max_abs_logit_diff": repr(report.get("max_abs_logit_diff")),
              "lorapipe.merge_max_rel_logit_diff": repr(report.get("max_rel_logit_diff"))}
    version_tags = {**tags, **metric_tags(metrics), **gate, **parity}
    versions = {}
    for kind, desc in (("adapter", "PEFT LoRA adapter; load onto lorapipe.base_model"),
                       ("merged", "base + adapter merged (dequantize-then-merge for QLoRA)")):
        model_name = f"{name}-{kind}"
        with_retries(lambda: _ensure_registered_model(c, model_name, desc), what="create registered model")
        with_retries(lambda: record_protected_aliases(c, model_name, cfg.registry.protected_aliases), what="tag registered model")
        mv = with_retries(lambda: c.create_model_version(model_name, source=f"{artifact_uri}/{kind}", run_id=run_id,
                                                         tags={**version_tags, "lorapipe.kind": kind}),
                          what="create model version")
        versions[kind] = mv.version
    return Registered(name, versions["adapter"], versions["merged"], run_id, created=True)
