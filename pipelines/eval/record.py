"""Eval results in MLflow, the MLflow 3 way: each registered version gets a LoggedModel (created
once, its id kept in the version tag `lorapipe.model_id`), and every suite metric is logged into
the version's source run with `model_id` and the eval set as its dataset (name + digest), so the
model's page lists the metrics per dataset. One version tag per suite,
`lorapipe.eval.<fingerprint>`, holds the compact result the promotion gate reads back."""
from __future__ import annotations

import json
from typing import Optional

from pipelines.core.defaults import default_tracking_uri
from pipelines.eval.result import EvalResult
from pipelines.tracking.runs import client as mlflow_client
from pipelines.tracking.runs import with_retries

MODEL_ID_TAG = "lorapipe.model_id"


def result_from_tag(raw: str, digest: str, label: str, kind: str, fingerprint: str):
    data = json.loads(raw)
    return EvalResult(metrics=data["metrics"], fingerprint=fingerprint, digest=digest,
                      tokenizer=data["tokenizer"], target=label, kind=kind, seconds=data.get("seconds", 0.0))


def version_result(mv, fingerprint: str):
    """The result a version already holds for this suite fingerprint (no download), or None."""
    from pipelines.artifacts.resolve import version_digest

    raw = mv.tags.get(f"lorapipe.eval.{fingerprint}")
    kind = mv.tags.get("lorapipe.kind", "merged")
    return result_from_tag(raw, version_digest(mv, kind), f"{mv.name} v{mv.version}", kind, fingerprint) if raw else None


def logged_model_id(c, mv) -> str:
    """The LoggedModel standing for this version (created the first time it is needed)."""
    if mv.tags.get(MODEL_ID_TAG):
        return mv.tags[MODEL_ID_TAG]
    run = c.get_run(mv.run_id)
    lm = with_retries(lambda: c.create_logged_model(
        run.info.experiment_id, name=mv.name, source_run_id=mv.run_id, model_type=f"lorapipe-{mv.tags.get('lorapipe.kind')}",
        tags={"lorapipe.registered_model": mv.name, "lorapipe.version": str(mv.version)}), what="create logged model")
    with_retries(lambda: c.finalize_logged_model(lm.model_id, "READY"), what="finalize logged model")
    with_retries(lambda: c.set_model_version_tag(mv.name, str(mv.version), MODEL_ID_TAG, lm.model_id), what="tag version")
    return lm.model_id


def record_version_result(name: str, version: str, result, prepared, tracking_uri: Optional[str]) -> None:
    """Metrics linked to the version's LoggedModel and eval datasets, plus the gate's tag."""
    c = mlflow_client(default_tracking_uri(tracking_uri))
    mv = c.get_model_version(name, str(version))
    model_id = logged_model_id(c, mv)
    for key, value in sorted(result.metrics.items()):
        dataset = key.split("/")[0] if not key.startswith("harness/") else "harness"
        digest = prepared.data_digests.get(dataset, prepared.fingerprint)[:32]
        with_retries(lambda: c.log_metric(mv.run_id, key, value, model_id=model_id, dataset_name=dataset,
                                          dataset_digest=digest), what="log eval metric")
    tag = json.dumps({"metrics": result.metrics, "tokenizer": result.tokenizer, "seconds": result.seconds},
                     separators=(",", ":"), sort_keys=True)
    with_retries(lambda: c.set_model_version_tag(mv.name, str(mv.version), f"lorapipe.eval.{result.fingerprint}", tag),
                 what="tag version")
