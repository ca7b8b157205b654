"""MLflow tracking: the driver opens and closes a run; rank 0 logs metrics into it.

A tracking server that goes away must not stop training: failed writes are kept and flushed
later, and what could not be logged is reported, never silently dropped.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional, TypeVar

from pipelines.core.errors import UserError
from pipelines.core.secrets import redact_mapping, redact_uri

log = logging.getLogger(__name__)
T = TypeVar("T")


def client(uri: str):
    from mlflow.tracking import MlflowClient

    # A new sqlite store logs its schema migration at INFO on stderr: noise in a one-line CLI.
    for name in ("mlflow.store.db.utils", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def with_retries(fn: Callable[[], T], *, attempts: int = 4, first_delay: float = 0.5, what: str = "MLflow call") -> T:
    """Bounded exponential backoff (0.5, 1, 2 s...); the last error propagates. A refusal (HTTP
    401/403) is not transient: it becomes a one-line UserError at once, naming the permission."""
    from pipelines.tracking.auth import access_error

    delay = first_delay
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:  # network, HTTP 5xx, sqlite locked: all retryable here
            denied = access_error(e, what)
            if denied is not None:
                raise denied from None
            if i == attempts - 1:
                raise
            log.warning("%s failed (%s); retrying in %.1fs", what, type(e).__name__, delay)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def artifact_root(uri: str) -> Optional[str]:
    """For the embedded sqlite store, artifacts live beside the database file (not in ./mlruns
    of whatever directory the process happened to start in)."""
    from pathlib import Path

    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return None


# MLflow 3's UI opens an experiment in its GenAI view unless this tag says it is model training.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def experiment_id(c, name: str, uri: str) -> str:
    """The experiment's id, created (model-training kind) when it does not exist yet."""
    exp = c.get_experiment_by_name(name)
    if exp is None:
        root = artifact_root(uri)
        return c.create_experiment(name, artifact_location=f"{root}/{name}" if root else None,
                                   tags=dict([EXPERIMENT_KIND]))
    if EXPERIMENT_KIND[0] not in exp.tags:  # made by an older lorapipe or by hand
        c.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
    return exp.experiment_id


def start_run(uri: str, experiment: str, run_name: str, params: dict, tags: dict,
              parent_run_id: Optional[str] = None) -> str:
    """Create a run with the flattened config as params; returns its id."""
    from mlflow.entities import Param

    c = client(uri)
    exp_id = with_retries(lambda: experiment_id(c, experiment, uri), what="MLflow experiment lookup")
    all_tags = dict(tags)
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = with_retries(lambda: c.create_run(exp_id, run_name=run_name, tags=redact_mapping(all_tags)),
                       what="MLflow create_run")
    safe = redact_mapping({k: str(v)[:6000] for k, v in flatten(params).items()})
    items = [Param(k, v) for k, v in safe.items()]
    for i in range(0, len(items), 100):
        with_retries(lambda: c.log_batch(run.info.run_id, params=items[i:i + 100]), what="MLflow log_batch")
    return run.info.run_id


def run_id_of(pending, timeout: Optional[float] = None) -> Optional[str]:
    """The id a `train.start_tracking` task returned; None (with a warning) when there is no such
    task or it could not create the run. Training never fails because tracking did."""
    if pending is None:
        return None
    import ray

    try:
        return ray.get(pending, timeout=timeout)
    except Exception as e:
        cause = getattr(e, "cause", None) or e
        log.warning("MLflow run not created (%s: %s)", type(cause).__name__, str(cause).splitlines()[0][:200]
                    if str(cause) else "")
        return None


def log_metrics(uri: str, run_id: str, metrics: dict, step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float))]
    client(uri).log_batch(run_id, metrics=batch)


def backfill_metrics(uri: str, run_id: str, history: list[dict]) -> list[int]:
    """Log every history entry whose step the MLflow run lacks (rank 0 could not reach the server
    when it happened). Never raises; returns the steps still missing (empty: all logged)."""
    missing = [int(m["step"]) for m in history]
    try:
        have = {m.step for m in client(uri).get_metric_history(run_id, "train_loss")}
        missing = [step for step in missing if step not in have]
        for m in history:
            if int(m["step"]) in missing:
                log_metrics(uri, run_id, m, int(m["step"]))
                missing.remove(int(m["step"]))
    except Exception as e:
        log.warning("MLflow unreachable (%s): %d steps not backfilled", type(e).__name__, len(missing))
    return missing


def finalize_run(uri: str, run_id: str, history: list[dict], final: dict) -> list[int]:
    """Backfill what training could not log, add the final_* metrics, mark the run FINISHED.
    Never raises; returns the steps MLflow still lacks (empty: the run is complete there)."""
    missing = backfill_metrics(uri, run_id, history)
    if missing:
        return missing
    try:
        c = client(uri)
        if not c.get_metric_history(run_id, "final_train_steps"):
            log_metrics(uri, run_id, {f"final_{k}": v for k, v in final.items()}, int(final["train_steps"]))
        finish_run(uri, run_id)
    except Exception as e:
        log.warning("MLflow run %s not finalised (%s)", run_id, type(e).__name__)
        return [int(final["train_steps"])]
    return []


def finish_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    with_retries(lambda: client(uri).set_terminated(run_id, status=status), what="MLflow set_terminated")


class MetricsLogger:
    """Rank 0's metric logger. Never raises and never holds training up for long: while the server
    is away, batches wait in `pending` and are retried no more often than `backoff` allows (doubling
    to `max_backoff`); `close()` makes one last attempt and says what could not be logged (the
    driver backfills it from the run directory, or `lorapipe sync` does later)."""

    def __init__(self, run_id: Optional[str], uri: str, backoff: float = 5.0, max_backoff: float = 60.0):
        self.run_id, self.uri = run_id, uri
        self.pending: list[tuple[dict, int]] = []
        self.first_backoff, self.backoff, self.max_backoff = backoff, backoff, max_backoff
        self.retry_at = 0.0

    def log(self, metrics: dict, step: int) -> None:
        if not self.run_id:
            return
        self.pending.append((metrics, step))
        if time.monotonic() >= self.retry_at:
            self.flush()

    def flush(self) -> None:
        try:
            while self.pending:
                m, s = self.pending[0]
                log_metrics(self.uri, self.run_id, m, s)
                self.pending.pop(0)
            self.backoff = self.first_backoff
        except Exception as e:
            self.retry_at = time.monotonic() + self.backoff
            log.warning("MLflow unreachable (%s): %d metric batches kept; next try in %.0fs",
                        type(e).__name__, len(self.pending), self.backoff)
            self.backoff = min(self.backoff * 2, self.max_backoff)

    def close(self) -> None:
        self.flush()
        if self.pending:
            log.warning("%d metric batches were not logged to MLflow; they are in the run directory", len(self.pending))


def reachable(uri: str) -> None:
    """Fail with one line (after bounded retries) when the tracking server cannot be reached."""
    c = client(uri)
    try:
        with_retries(lambda: c.search_experiments(max_results=1), attempts=3, what="MLflow server check")
    except UserError:  # reached, but it refused the credentials
        raise
    except Exception as e:
        raise UserError(f"MLflow at {redact_uri(uri)} is unreachable "
                        f"({type(e).__name__}); nothing was registered") from None
