"""`lorapipe eval`: a model (run dir, registered version, or a base alone) on a suite, cached by
(target digest, suite fingerprint) and recorded in MLflow.

Where it runs: as a Ray task holding the resources the run's config asks for (one GPU when
`scaling.use_gpu`, else `scaling.cpus_per_worker` CPUs) when the config wants a GPU or Ray is
already running in this process; otherwise in this process (a tiny CPU model loads faster than a
Ray worker starts).

Where results are kept (all three are read before anything is computed):
  <run_dir>/eval/<fingerprint>.json        for a run directory (atomic write)
  <cache>/eval/<digest>/<fingerprint>.json beside resolve's download cache, for any target
  version tag lorapipe.eval.<fingerprint>  for a registered version (plus MLflow metrics, record.py)
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path
from typing import Optional

from pipelines.artifacts.resolve import ResolvedModel, cache_root, load_for_inference, resolve
from pipelines.config.eval_suite import EvalSuite
from pipelines.core.files import write_text_atomic
from pipelines.eval.result import EvalResult
from pipelines.eval.suite import PreparedSuite, prepare_suite

TAG_PREFIX = "lorapipe.eval."


def evaluate(target: str | ResolvedModel, suite: EvalSuite, *, tracking_uri: Optional[str] = None,
             record: bool = True) -> EvalResult:
    """The suite's metrics for `target`, computed at most once per (digest, fingerprint)."""
    model = resolve(target, tracking_uri) if isinstance(target, str) else target
    prepared = prepare_suite(suite)  # bad rows / tasks fail here, before any model loads
    found = cached_result(model, prepared.fingerprint, tracking_uri)
    if found is not None:
        store_result(model, found, prepared, tracking_uri, record=record)  # fills the caches that lacked it
        return found
    started = time.time()
    metrics, tok = run_metrics(model, prepared)
    result = EvalResult(metrics, prepared.fingerprint, model.digest, tok, model.label, model.kind,
                        round(time.time() - started, 2), computed=True)
    store_result(model, result, prepared, tracking_uri, record=record)
    return result


# -- computing ---------------------------------------------------------------------------------
def run_metrics(model: ResolvedModel, prepared: PreparedSuite) -> tuple[dict[str, float], str]:
    import ray

    sc = model.config.scaling
    if not (sc.use_gpu or ray.is_initialized()):
        return compute_metrics(model, prepared, "cpu")
    from pipelines.train.ray_cluster import ensure_ray

    ensure_ray(model.config)
    # DEFAULT scheduling: called from a Tune trial (lorapipe ablate), the task must not join the
    # trial's placement group, whose only bundle is the trial driver's (no CPUs).
    task = ray.remote(num_cpus=sc.cpus_per_worker, num_gpus=1 if sc.use_gpu else 0,
                      scheduling_strategy="DEFAULT")(compute_metrics)
    return ray.get(task.remote(model, prepared, "cuda" if sc.use_gpu else "cpu"))


def compute_metrics(model: ResolvedModel, prepared: PreparedSuite, device: str) -> tuple[dict[str, float], str]:
    """Load the model as the reference means it, then every eval set and harness task on it."""
    from pipelines.data.prompts import template_for
    from pipelines.eval.metrics import set_metrics

    loaded, tokenizer = load_for_inference(model, device=device)
    template = template_for(model.config.data.format)
    metrics: dict[str, float] = {}
    for spec in prepared.suite.sets:
        metrics.update(set_metrics(loaded, tokenizer, spec, prepared.rows[spec.name], template))
    if prepared.suite.harness is not None:
        from pipelines.eval.harness import harness_metrics

        metrics.update(harness_metrics(loaded, tokenizer, prepared.suite.harness))
    return metrics, tokenizer_digest(tokenizer)


def tokenizer_digest(tokenizer) -> str:
    """Same digest <=> same token ids for the same text (vocabulary, special tokens, chat template)."""
    blob = json.dumps({"vocab": sorted(tokenizer.get_vocab().items()),
                       "special": sorted(map(str, tokenizer.all_special_tokens)),
                       "chat_template": getattr(tokenizer, "chat_template", None)}, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


# -- caches --------------------------------------------------------------------------------------
def local_cache_file(digest: str, fingerprint: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", digest)
    return cache_root().parent / "eval" / safe / f"{fingerprint}.json"


def run_dir_file(model: ResolvedModel, fingerprint: str) -> Optional[Path]:
    return model.run_dir / "eval" / f"{fingerprint}.json" if model.run_dir and model.kind in ("adapter", "full") else None


def cached_result(model: ResolvedModel, fingerprint: str, tracking_uri: Optional[str]) -> Optional[EvalResult]:
    for f in (run_dir_file(model, fingerprint), local_cache_file(model.digest, fingerprint)):
        if f is not None and f.is_file():
            result = EvalResult.from_json(f.read_text())
            if result.digest == model.digest:
                return result
    raw = model.tags.get(f"{TAG_PREFIX}{fingerprint}")
    if raw and model.name:
        from pipelines.eval.record import result_from_tag

        return result_from_tag(raw, model.digest, model.label, model.kind, fingerprint)
    return None


def store_result(model: ResolvedModel, result: EvalResult, prepared: PreparedSuite, tracking_uri: Optional[str],
                 *, record: bool) -> None:
    for f in (run_dir_file(model, result.fingerprint), local_cache_file(model.digest, result.fingerprint)):
        if f is not None and not f.is_file():
            write_text_atomic(f, result.to_json())
    if record and model.name and f"{TAG_PREFIX}{result.fingerprint}" not in model.tags:
        from pipelines.eval.record import record_version_result

        record_version_result(model.name, model.version, result, prepared, tracking_uri)
