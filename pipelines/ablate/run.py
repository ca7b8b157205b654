"""`lorapipe ablate KIND CONFIG`: one classic LoRA table from one command.

The values of the ablation become a Ray Tune grid (trials run in parallel as the cluster allows);
each trial is one ordinary Ray Train run (its own run directory, an MLflow run nested under the
ablation's parent run) followed by the config's eval suite on that run directory, so every row is
measured on the same rows. Peak memory and training time come from the run's own measurements
(metrics.json), never from the planner.

<out>/<kind>-<value>/     each trial's run directory (eval results cached in its eval/)
<out>/table.md, table.csv, plot.png, results.json
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pipelines.ablate.grid import trial_configs
from pipelines.ablate.table import CSV_COLUMNS, csv_text, markdown_table, plot_ablation
from pipelines.artifacts.rundir import RunDir
from pipelines.config.eval_suite import EvalSuite
from pipelines.config.schema import PipelineConfig
from pipelines.core.errors import UserError
from pipelines.core.files import write_text_atomic
from pipelines.tune.search import trials_that_fit

NEEDED_METRICS = ("exact_match", "perplexity", "loss")  # accuracy, perplexity, eval_loss


@dataclass
class AblationResult:
    kind: str
    rows: list[dict]
    out_dir: Path
    table_md: Path
    table_csv: Path
    plot: Optional[Path]
    parent_run_id: Optional[str]

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.rows if r["status"] != "completed"]


# -- checks before anything heavy ------------------------------------------------------------------
def table_set(cfg: PipelineConfig, suite: EvalSuite) -> str:
    """The eval set whose exact match, perplexity and loss fill the table: the set of the suite's
    primary metric, else the first set computing all three."""
    primary = suite.primary.metric.split("/")[0]
    by_name = {s.name: s for s in suite.sets}
    candidates = ([by_name[primary]] if primary in by_name else []) + list(suite.sets)
    for spec in candidates:
        if all(m in spec.metrics for m in NEEDED_METRICS):
            return spec.name
    first = candidates[0]
    missing = [m for m in NEEDED_METRICS if m not in first.metrics]
    raise UserError(f"eval set {first.name!r} of {cfg.name}'s suite computes {', '.join(first.metrics)}; the ablation "
                    f"table needs exact_match, perplexity and loss: add {', '.join(missing)} to its metrics")


def ablation_suite(cfg: PipelineConfig) -> tuple[EvalSuite, str]:
    from pipelines.eval.suite import prepare_suite, suite_for_config

    if cfg.eval is None:
        raise UserError(f"config {cfg.name!r} has no eval: section, and an ablation evaluates every trial on one "
                        "suite: add eval: {suite_file: configs/eval/ablate.yaml} (a suite whose set computes "
                        "exact_match, perplexity and loss)")
    suite = suite_for_config(cfg)
    name = table_set(cfg, suite)
    prepare_suite(suite)  # missing files and bad rows fail now, not after training
    return suite, name


def unmet_resource(cfg: PipelineConfig, total: dict, per_node: list[dict]) -> Optional[str]:
    """Why one trial can never be placed on this cluster (None when it can): a trial holds
    num_workers workers at once, each needing cpus_per_worker CPUs (and a GPU) on one node."""
    sc = cfg.scaling
    need_cpu = sc.num_workers * sc.cpus_per_worker
    how = f"scaling.num_workers={sc.num_workers} x scaling.cpus_per_worker={sc.cpus_per_worker:g}"
    if total.get("CPU", 0) < need_cpu:
        return (f"one trial needs {need_cpu:g} CPUs ({how}) but the cluster has {total.get('CPU', 0):g}: lower them "
                "or add nodes")
    if per_node and max(n.get("CPU", 0) for n in per_node) < sc.cpus_per_worker:
        return (f"a worker needs {sc.cpus_per_worker:g} CPUs on one node (scaling.cpus_per_worker) but no node has "
                "that many")
    if sc.use_gpu and total.get("GPU", 0) < sc.num_workers:
        return (f"one trial needs {sc.num_workers} GPUs (scaling.num_workers with scaling.use_gpu) but the cluster "
                f"has {total.get('GPU', 0):g}")
    return None


def check_cluster(cfg: PipelineConfig) -> int:
    """Trials that fit at once; a one-line UserError when not even one does."""
    import ray

    total = ray.cluster_resources()
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    problem = unmet_resource(cfg, total, nodes)
    if problem:
        raise UserError(f"ablation cannot run on this cluster: {problem}")
    return trials_that_fit(cfg, total)


# -- trials ----------------------------------------------------------------------------------------
def slug(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", value).strip("_") or "value"


def ablation_trial(config: dict, configs: dict, suite: dict, parent_run_id: Optional[str]) -> None:
    """One value: a Ray Train run, then the suite on its run directory (the result is cached in
    the run directory, where the driver reads it)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipelines.eval.run import evaluate
    from pipelines.train.driver import train

    cfg = PipelineConfig.model_validate(configs[config["value"]])
    run = train(cfg, progress=False, tune_trial_id=tune.get_context().get_trial_id(), parent_run_id=parent_run_id,
                callbacks=[TuneReportCallback()], preflight_checks=False)
    evaluate(str(run.path), EvalSuite.model_validate(suite), record=False)


def adapter_modules(run: RunDir) -> Optional[list[str]]:
    """The module names the adapter wraps (what a preset resolved to); None for full fine-tuning."""
    f = run.path / "adapter" / "adapter_config.json"
    if not f.is_file():
        return None
    modules = json.loads(f.read_text()).get("target_modules")
    return sorted(modules) if isinstance(modules, list) else [str(modules)]


def completed_row(value: str, run: RunDir, suite: EvalSuite, set_name: str) -> dict:
    from pipelines.eval.run import evaluate

    m = run.metrics()
    ev = evaluate(str(run.path), suite, record=False).metrics  # computed by the trial: a cache read
    trainable, total = m["trainable_params"], m["total_params"]
    return {"value": value, "status": "completed", "trainable_params": trainable,
            "trainable_pct": round(100.0 * trainable / total, 4), "accuracy": ev[f"{set_name}/exact_match"],
            "perplexity": ev[f"{set_name}/perplexity"], "eval_loss": ev[f"{set_name}/loss"],
            "peak_memory_bytes": m["peak_memory_bytes"], "train_seconds": round(m["train_seconds"], 2),
            "modules": adapter_modules(run), "run_dir": str(run.path),
            "mlflow_run_id": run.lineage().get("mlflow_run_id"), "suite_metrics": ev}


def result_rows(results, configs: dict[str, PipelineConfig], out_dir: Path, suite: EvalSuite, set_name: str) -> list[dict]:
    """One row per value, in the order the values were given."""
    errors = {r.config["value"]: r.error for r in results if r.config}
    rows = []
    for value, cfg in configs.items():
        path = out_dir / cfg.run.name
        if RunDir.is_complete(path) and errors.get(value) is None:
            rows.append(completed_row(value, RunDir.open(path), suite, set_name))
        else:
            err = errors.get(value)
            rows.append({"value": value, "status": "error",
                         "error": str(err).strip().splitlines()[-1][:300] if err else "no run directory"})
    return rows


# -- outputs ---------------------------------------------------------------------------------------
def write_outputs(kind: str, rows: list[dict], out_dir: Path, title: str) -> tuple[Path, Path, Optional[Path]]:
    md, csv_path = out_dir / "table.md", out_dir / "table.csv"
    write_text_atomic(md, f"# {title}\n\n" + markdown_table(kind, rows))
    write_text_atomic(csv_path, csv_text(rows))
    write_text_atomic(out_dir / "results.json", json.dumps(rows, indent=2, default=str))
    tmp_png = out_dir / ".plot.tmp.png"  # matplotlib picks the format from the suffix
    plot = plot_ablation(kind, rows, tmp_png, title)
    if plot is not None:
        plot = tmp_png.replace(out_dir / "plot.png")
    return md, csv_path, plot


def log_to_mlflow(cfg: PipelineConfig, parent: str, kind: str, rows: list[dict], files: list[Path]) -> None:
    """The table on the parent run; each trial's table figures on its nested run."""
    from pipelines.tracking import runs as tracking

    uri = cfg.tracking_uri()
    c = tracking.client(uri)
    for f in files:
        if f is not None:
            tracking.with_retries(lambda: c.log_artifact(parent, str(f)), what="upload ablation table")
    for row in rows:
        run_id = row.get("mlflow_run_id")
        if row["status"] != "completed" or not run_id:
            continue
        c.set_tag(run_id, "lorapipe.ablate.value", row["value"])
        figures = {f"ablate_{k}": row[k] for k in CSV_COLUMNS if k != "value"}
        figures.update({f"suite/{k}": v for k, v in row["suite_metrics"].items()})
        tracking.log_metrics(uri, run_id, figures, 0)
    tracking.finish_run(uri, parent, "FINISHED" if all(r["status"] == "completed" for r in rows) else "FAILED")


def prepared_configs(cfg: PipelineConfig, kind: str, values: Optional[list[str]], out_dir: Path) -> dict[str, PipelineConfig]:
    """Each value's config with builtins materialised, absolute paths, and its run directory
    under out_dir; every target-module preset checked against the model before Ray starts."""
    from pipelines.data.builtin import resolve_builtins
    from pipelines.train.driver import check_target_modules, resolved_paths

    configs = trial_configs(cfg, kind, values)
    for value, c in configs.items():
        c = resolved_paths(resolve_builtins(c))
        c.run.name = f"{kind}-{slug(value)}"
        c.run.output_dir = str(out_dir)
        check_target_modules(c)
        configs[value] = c
    return configs


def default_out_dir(cfg: PipelineConfig, kind: str) -> Path:
    return Path(cfg.run.output_dir).expanduser().resolve() / f"ablate-{cfg.name}-{kind}"


def ablate(cfg: PipelineConfig, kind: str, values: Optional[list[str]] = None, out: Optional[str] = None, *,
           progress: bool = True) -> AblationResult:
    from ray import tune as rt

    from pipelines.tracking import runs as tracking
    from pipelines.train.driver import preflight
    from pipelines.train.ray_cluster import ensure_ray

    out_dir = Path(out).expanduser().resolve() if out else default_out_dir(cfg, kind)
    if out_dir.exists():
        raise UserError(f"{out_dir} already exists; pass --out DIR for a new ablation or remove it")
    configs = prepared_configs(cfg, kind, values, out_dir)
    suite, set_name = ablation_suite(cfg)
    base = next(iter(configs.values()))
    preflight(base)  # data rows, tokenizer, 4-bit support: the values share the data
    ensure_ray(base)
    concurrent = check_cluster(base)
    name = f"ablate-{cfg.name}-{kind}"
    parent = None
    if base.mlflow.enabled:
        parent = tracking.start_run(base.tracking_uri(), base.mlflow.experiment, name,
                                    {"ablate": {"kind": kind, "values": list(configs)}},
                                    {"lorapipe.kind": "ablate", "lorapipe.ablate.kind": kind})
    trainable = rt.with_resources(
        rt.with_parameters(ablation_trial, configs={v: c.model_dump(mode="json") for v, c in configs.items()},
                           suite=suite.model_dump(mode="json"), parent_run_id=parent),
        {"CPU": 0, "memory": 1})  # a trial's driver only waits; its Train workers and its eval hold the CPUs
    tuner = rt.Tuner(trainable, param_space={"value": rt.grid_search(list(configs))},
                     tune_config=rt.TuneConfig(max_concurrent_trials=concurrent),
                     run_config=rt.RunConfig(name=f"{name}-{time.strftime('%Y%m%d-%H%M%S')}",
                                             storage_path=base.storage_path(), verbose=1 if progress else 0))
    results = tuner.fit()
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = result_rows(results, configs, out_dir, suite, set_name)
    title = f"{kind} ablation: {cfg.name}, {set_name} ({time.strftime('%Y-%m-%d')})"
    md, csv_path, plot = write_outputs(kind, rows, out_dir, title)
    if parent:
        log_to_mlflow(base, parent, kind, rows, [md, csv_path, plot, out_dir / "results.json"])
    return AblationResult(kind, rows, out_dir, md, csv_path, plot, parent)
