"""MLflow registry: log a run directory's adapter and merged model and register both as versions
(a full fine-tuning run: its whole model, one version of NAME-full, no merge and no parity).

Everything here reads only the run directory. The registry only ever sees complete artifacts:
the merge is finished and verified on local disk before anything is uploaded, and a version
is created only after its artifacts are logged.
"""
from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from pipelines.artifacts.rundir import RunDir
from pipelines.core.errors import UserError
from pipelines.eval.gate import GateSuite, gate_suite, set_gate_suite
from pipelines.eval.record import record_version_result
from pipelines.tracking.auth import authorize_registration, record_protected_aliases
from pipelines.tracking.runs import client as mlflow_client
from pipelines.tracking.runs import reachable, start_run, with_retries

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


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


def _find_versions(c, name: str, digest: str, tag: str = "lorapipe.adapter_sha256") -> list:
    """Versions of `name` already registered from these exact weights (idempotent register)."""
    from mlflow.exceptions import MlflowException

    try:
        found = c.search_model_versions(f"name='{name}'")
    except MlflowException:
        return []
    return [v for v in found if v.tags.get(tag) == digest]


def _ensure_registered_model(c, name: str, description: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        c.get_registered_model(name)
    except MlflowException:
        c.create_registered_model(name, description=description)


@dataclass
class Registered:
    name: str
    adapter_version: Optional[str]
    merged_version: Optional[str]
    run_id: str
    created: bool
    parity: dict = field(default_factory=dict)  # gate-suite metric -> |adapter - merged| (relative above 1)
    full_version: Optional[str] = None          # a full fine-tuning run: its one version of NAME-full

    def versions(self) -> dict[str, str]:
        """Registered model name -> the version this registration made (or found)."""
        if self.full_version is not None:
            return {f"{self.name}-full": self.full_version}
        return {f"{self.name}-{kind}": v for kind, v in (("adapter", self.adapter_version),
                                                          ("merged", self.merged_version)) if v is not None}


def register_run(run_dir: str | Path, name: Optional[str] = None, tracking_uri: Optional[str] = None, *,
                 suite=None, merged_dir: Optional[str | Path] = None) -> Registered:
    """Log and register the run's adapter and merged model. Both are evaluated on the model's gate
    suite first (`suite` or the run config's, when the model has none yet); a merged model whose
    metrics differ from the adapter's beyond the suite's parity_tolerance is not registered.
    `merged_dir`: a merge already made by `lorapipe merge` for this run (else merged here)."""
    from pipelines.registry.merge import merge_run

    run = RunDir.open(run_dir)
    run.verify_digests()
    if run.kind == "full":
        if merged_dir:
            raise UserError(f"{run.path} is a full fine-tuning run: its model/ is registered as it is (no --merged)")
        return register_full_run(run, name, tracking_uri, suite=suite)
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
    gate, new_gate = gate_for(c, name, cfg, suite, (f"{name}-merged", f"{name}-adapter"))
    with tempfile.TemporaryDirectory(prefix="lorapipe-merge-") as tmp:
        merged = Path(merged_dir) if merged_dir else Path(tmp) / "merged"
        report = check_merged_dir(merged, run) if merged_dir else merge_run(run.path, merged)
        results, parity = parity_on_suite(run, merged, gate)  # before any upload
        run_id = lineage.get("mlflow_run_id")
        if not _run_exists(c, run_id):
            run_id = start_run(uri, cfg.mlflow.experiment, run.path.name, cfg.model_dump(mode="json"),
                               {"lorapipe.registered_from": str(run.path)})
        tags = {**lineage_tags(lineage), "lorapipe.run_dir": str(run.path), "lorapipe.adapter_sha256": digest}
        for k, v in tags.items():
            with_retries(lambda: c.set_tag(run_id, k, v), what="MLflow set_tag")
        upload_run_files(c, run_id, run, merged if parity.ok else None)
    if new_gate:
        for kind in ("adapter", "merged"):
            with_retries(lambda: _ensure_registered_model(c, f"{name}-{kind}", DESCRIPTIONS[kind]),
                         what="create registered model")
            set_gate_suite(c, f"{name}-{kind}", gate.suite, gate.fingerprint)
    artifact_uri = c.get_run(run_id).info.artifact_uri
    version_tags = {**tags, **metric_tags(metrics), **parity.tags(), **merge_tags(report)}
    versions = {"adapter": existing_a[0].version if existing_a else None}
    for kind in ("adapter", "merged") if parity.ok else ("adapter",):
        if versions.get(kind) is None:  # (an adapter version left by a registration whose merge was refused)
            versions[kind] = create_version(c, f"{name}-{kind}", kind, f"{artifact_uri}/{kind}", run_id, version_tags,
                                            cfg.registry.protected_aliases)
            record_version_result(f"{name}-{kind}", versions[kind], results[kind], results["prepared"], uri)
    if not parity.ok:
        raise UserError(f"{parity.worst_line()}; registered {name}-adapter v{versions['adapter']} only, "
                        f"the merged model was not registered")
    return Registered(name, versions["adapter"], versions["merged"], run_id, created=True, parity=parity.diffs)


DESCRIPTIONS = {"adapter": "PEFT LoRA adapter; load onto lorapipe.base_model",
                "merged": "base + adapter merged (dequantize-then-merge for QLoRA)",
                "full": "fully fine-tuned model (every weight of lorapipe.base_model trained)"}


def register_full_run(run: RunDir, name: Optional[str], tracking_uri: Optional[str], *, suite=None) -> Registered:
    """A full fine-tuning run: its model/ uploaded and registered as one version of NAME-full, with
    the lineage tags and the gate suite an adapter run's versions get, evaluated on that suite first."""
    from pipelines.artifacts.resolve import resolve_run_dir
    from pipelines.eval.run import evaluate
    from pipelines.eval.suite import prepare_suite

    cfg, metrics, lineage = run.config(), run.metrics(), run.lineage()
    name = check_name(name or cfg.registry_name())
    model_name = f"{name}-full"
    uri = tracking_uri or cfg.tracking_uri()
    reachable(uri)
    c = mlflow_client(uri)
    authorize_registration(uri, c, cfg.mlflow.experiment, (model_name,))  # before any upload
    digest = run.digest_of(run.weights_file)
    existing = _find_versions(c, model_name, digest, "lorapipe.model_sha256")
    if existing:
        return Registered(name, None, None, existing[0].run_id, created=False, full_version=str(existing[0].version))
    gate, new_gate = gate_for(c, name, cfg, suite, (model_name,))
    result = evaluate(resolve_run_dir(run.path), gate.suite, record=False)  # before any upload
    run_id = lineage.get("mlflow_run_id")
    if not _run_exists(c, run_id):
        run_id = start_run(uri, cfg.mlflow.experiment, run.path.name, cfg.model_dump(mode="json"),
                           {"lorapipe.registered_from": str(run.path)})
    tags = {**lineage_tags(lineage), "lorapipe.run_dir": str(run.path), "lorapipe.model_sha256": digest,
            "lorapipe.method": "full"}
    for k, v in tags.items():
        with_retries(lambda: c.set_tag(run_id, k, v), what="MLflow set_tag")
    with_retries(lambda: c.log_artifacts(run_id, str(run.model), "full"), what="upload model")
    upload_run_metadata(c, run_id, run)
    if new_gate:
        with_retries(lambda: _ensure_registered_model(c, model_name, DESCRIPTIONS["full"]), what="create registered model")
        set_gate_suite(c, model_name, gate.suite, gate.fingerprint)
    artifact_uri = c.get_run(run_id).info.artifact_uri
    version = create_version(c, model_name, "full", f"{artifact_uri}/full", run_id, {**tags, **metric_tags(metrics)},
                             cfg.registry.protected_aliases)
    record_version_result(model_name, version, result, prepare_suite(gate.suite), uri)
    return Registered(name, None, None, run_id, created=True, full_version=version)


def create_version(c, model_name: str, kind: str, source: str, run_id: str, tags: dict, protected: list[str]) -> str:
    with_retries(lambda: _ensure_registered_model(c, model_name, DESCRIPTIONS[kind]), what="create registered model")
    with_retries(lambda: record_protected_aliases(c, model_name, protected), what="tag registered model")
    mv = with_retries(lambda: c.create_model_version(model_name, source=source, run_id=run_id,
                                                     tags={**tags, "lorapipe.kind": kind}),
                      what="create model version")
    return str(mv.version)


def upload_run_files(c, run_id: str, run: RunDir, merged: Optional[Path]) -> None:
    with_retries(lambda: c.log_artifacts(run_id, str(run.adapter), "adapter"), what="upload adapter")
    if merged is not None:
        with_retries(lambda: c.log_artifacts(run_id, str(merged), "merged"), what="upload merged model")
    upload_run_metadata(c, run_id, run)


def upload_run_metadata(c, run_id: str, run: RunDir) -> None:
    """run/: the config, metrics and lineage a registered version is read with (resolve)."""
    for f in ("config.yaml", "metrics.json", "lineage.json"):
        with_retries(lambda: c.log_artifact(run_id, str(run.path / f), "run"), what=f"upload {f}")


def merge_tags(report: dict) -> dict[str, str]:
    return {"lorapipe.merge_method": str(report.get("method")),
            "lorapipe.merge_max_abs_logit_diff": repr(report.get("max_abs_logit_diff")),
            "lorapipe.merge_max_rel_logit_diff": repr(report.get("max_rel_logit_diff"))}


def check_merged_dir(merged: Path, run: RunDir) -> dict:
    """A merge made earlier by `lorapipe merge` of this very run."""
    import json

    report_file = merged / "merge_report.json"
    if not report_file.is_file():
        raise UserError(f"--merged {merged} is not a `lorapipe merge` output (no merge_report.json)")
    report = json.loads(report_file.read_text())
    if Path(report.get("run_dir", "")).resolve() != run.path.resolve():
        raise UserError(f"--merged {merged} was merged from {report.get('run_dir')}, not {run.path}")
    return report


def gate_for(c, name: str, cfg, suite, model_names: tuple[str, ...]):
    """(the model's gate suite, whether it is new): the one recorded at first registration on the
    first of `model_names` that has one; a different suite passed now is refused (set-gate changes
    it, explicitly)."""
    from pipelines.eval.suite import prepare_suite, suite_for_config

    recorded = None
    for model_name in model_names:
        recorded = gate_suite_if_exists(c, model_name)
        if recorded is not None:
            break
    if recorded is not None:
        if suite is not None and prepare_suite(suite).fingerprint != recorded.fingerprint:
            raise UserError(f"{name} already has a gate suite (fingerprint {recorded.fingerprint[:12]}); change it "
                            f"with `lorapipe registry set-gate {model_names[0]} --suite FILE`")
        return recorded, False
    chosen = suite or suite_for_config(cfg)
    return GateSuite(chosen, prepare_suite(chosen).fingerprint), True


def gate_suite_if_exists(c, model_name: str):
    try:
        return gate_suite(c, model_name)
    except UserError:  # not registered yet
        return None


@dataclass
class Parity:
    diffs: dict
    adapter: dict
    merged: dict
    tolerance: float

    @property
    def ok(self) -> bool:
        return all(d <= self.tolerance for d in self.diffs.values())

    def tags(self) -> dict[str, str]:
        return {"lorapipe.parity": json.dumps(self.diffs, sort_keys=True, separators=(",", ":")),
                "lorapipe.parity_tolerance": repr(self.tolerance), "lorapipe.parity_ok": str(self.ok).lower()}

    def worst_line(self) -> str:
        metric = max(self.diffs, key=self.diffs.get)
        return (f"merged model differs from its adapter on the gate suite: {metric} adapter "
                f"{self.adapter[metric]:.6g} vs merged {self.merged[metric]:.6g} (difference {self.diffs[metric]:.3g} > "
                f"parity_tolerance {self.tolerance:g})")


def parity_on_suite(run: RunDir, merged: Path, gate) -> tuple[dict, Parity]:
    """The adapter (base as training loaded it + adapter) and the merged model on the gate suite."""
    from dataclasses import replace

    from pipelines.artifacts.resolve import resolve_run_dir
    from pipelines.core.files import sha256_file
    from pipelines.eval.run import evaluate
    from pipelines.eval.suite import prepare_suite

    adapter_model = resolve_run_dir(run.path)
    # Cached under the merged weights' own content digest: a corrupt merge never poisons a cache.
    merged_model = replace(adapter_model, kind="merged", model_path=merged, adapter_path=None, run_dir=None,
                           digest=f"merged-file:{sha256_file(merged / 'model.safetensors')}")
    a = evaluate(adapter_model, gate.suite, record=False)
    m = evaluate(merged_model, gate.suite, record=False)
    diffs = {k: abs(a.metrics[k] - m.metrics[k]) / max(1.0, abs(a.metrics[k])) for k in a.metrics}
    results = {"adapter": a, "merged": m, "prepared": prepare_suite(gate.suite)}
    return results, Parity(diffs, a.metrics, m.metrics, gate.suite.parity_tolerance)
