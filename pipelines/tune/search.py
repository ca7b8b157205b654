"""Ray Tune over the Ray Train driver (Train V2 pattern): each trial is one full TorchTrainer run
with its own workers and DeepSpeed, named from its trial id, reporting to Tune through
TuneReportCallback; ASHA stops weak trials (their workers are released with the trial).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pipelines.artifacts.rundir import RunDir
from pipelines.config.load import apply_trial_values
from pipelines.config.schema import PipelineConfig
from pipelines.config.tune_space import TuneSection
from pipelines.core.errors import UserError
from pipelines.tune.space import decode_values, default_point, encode_space, to_ray_space


def trial_fn(config: dict, base: dict, experiment_dir: str, parent_run_id: Optional[str]) -> None:
    """One trial: the base config with this trial's values -> one Ray Train run -> run directory."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipelines.train.driver import train

    trial_id = tune.get_context().get_trial_id()
    done = Path(experiment_dir) / f"trial_{trial_id}"
    if RunDir.is_complete(done):
        # Finished before the driver died but after Tune last saved its state: report, don't re-run.
        run = RunDir.open(done)
        tune.report({**run.history()[-1], **{k: v for k, v in run.metrics().items() if isinstance(v, (int, float))}})
        return
    cfg = apply_trial_values(PipelineConfig.model_validate(base), decode_values(config))
    cfg.run.name = f"trial_{trial_id}"  # from the trial id: stable across restore
    cfg.run.output_dir = experiment_dir
    train(cfg, progress=False, tune_trial_id=trial_id, parent_run_id=parent_run_id,
          callbacks=[TuneReportCallback()], preflight_checks=False)


def max_concurrent(cfg: PipelineConfig, section: TuneSection) -> int:
    """Trials that fit at once on the cluster: each holds num_workers x (CPUs, GPU)."""
    import ray

    if section.max_concurrent_trials:
        return section.max_concurrent_trials
    return trials_that_fit(cfg, ray.cluster_resources())


def trials_that_fit(cfg: PipelineConfig, resources: dict) -> int:
    """Trials of this config that `resources` (Ray's cluster totals) hold at once, at least 1."""
    sc = cfg.scaling
    by_cpu = int(resources.get("CPU", 1) // (sc.num_workers * sc.cpus_per_worker))
    by_gpu = int(resources.get("GPU", 0) // sc.num_workers) if sc.use_gpu else by_cpu
    return max(1, min(by_cpu, by_gpu))


def search_seed(cfg: PipelineConfig, section: TuneSection) -> int:
    """The search has its own seed so repeated searches can differ while training stays identical."""
    return cfg.seed if section.seed is None else section.seed


def build_search(cfg: PipelineConfig, section: TuneSection):
    if section.search == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        start = default_point(cfg, section)
        return OptunaSearch(points_to_evaluate=[start] if start else None,
                            sampler=optuna.samplers.TPESampler(seed=search_seed(cfg, section)))
    if section.search == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        start = default_point(cfg, section)
        return BasicVariantGenerator(random_state=search_seed(cfg, section), points_to_evaluate=[start] if start else None)
    return None  # grid: Tune's default generator expands grid_search


def build_scheduler(cfg: PipelineConfig, section: TuneSection):
    if not section.asha.enabled:
        return None
    from ray.tune.schedulers import ASHAScheduler

    # stop_last_trials=False: a trial that reaches max_t ends by itself (run directory written,
    # workers shut down by Ray Train) instead of being killed at its last report.
    return ASHAScheduler(time_attr="step", max_t=cfg.train.max_steps, stop_last_trials=False,
                         grace_period=section.asha.grace_period, reduction_factor=section.asha.reduction_factor)


@dataclass
class SearchResult:
    experiment_path: str
    output_dir: str
    rows: list[dict]
    best: dict
    best_config_path: str
    plot_path: Optional[str]
    base: PipelineConfig

    def best_config_for_training(self) -> PipelineConfig:
        from pipelines.config.load import load_config

        return load_config(self.best_config_path)

    def finished_best_run(self) -> Optional[RunDir]:
        """The best trial's own run directory when it ran to max_steps: training that config again
        would only repeat it (on an 8B job, the best run's GPU hours twice)."""
        path = self.best.get("run_dir")
        if self.best.get("status") == "completed" and path and RunDir.is_complete(path):
            return RunDir.open(path)
        return None


def trial_rows(results, section: TuneSection, max_steps: int) -> list[dict]:
    rows = []
    for r in results:
        m = r.metrics or {}
        trial_id = m.get("trial_id") or (r.path.rstrip("/").rsplit("_", 1)[-1] if r.path else "?")
        steps = int(m.get("step", 0))
        status = "error" if r.error else ("completed" if steps >= max_steps else "stopped early")
        values = decode_values({k: v for k, v in (r.config or {}).items()})
        rows.append({"trial_id": trial_id, "params": values, section.metric: m.get(section.metric),
                     "steps": steps, "status": status, "history": _history(r)})
    return rows


def _history(result) -> list[dict]:
    df = result.metrics_dataframe
    if df is None or "step" not in df:
        return []
    cols = [c for c in ("step", "eval_loss", "train_loss") if c in df]
    return df[cols].to_dict("records")


def stopped_trial_run_dir(cfg: PipelineConfig, storage: str, out_dir: Path, row: dict) -> Optional[str]:
    """Every trial ends in a run directory: finished trials wrote theirs; for trials ASHA stopped,
    write it from their last complete checkpoint (metrics are as of that step)."""
    from pipelines.data.prepare import dataset_fingerprint
    from pipelines.train.checkpoint import latest_complete_checkpoint
    from pipelines.train.driver import run_dir_from_checkpoint

    run_dir = out_dir / f"trial_{row['trial_id']}"
    if run_dir.is_dir():
        return str(run_dir)
    ckpt = latest_complete_checkpoint(Path(storage) / f"trial_{row['trial_id']}")
    if ckpt is None:
        return None
    out = run_dir_from_checkpoint(ckpt, run_dir, source_model=cfg.model.path,
                                  fingerprint=dataset_fingerprint(cfg.data, None), data_stats={},
                                  extra={"tune_trial_id": row["trial_id"], "status": row["status"]})
    return str(out.path)


def plot_trials(rows: list[dict], metric: str, out: Path) -> Optional[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        pts = [(h["step"], h[metric]) for h in row["history"] if h.get(metric) == h.get(metric) and metric in h]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", label=f"{row['trial_id']} ({row['status']})")
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} by trial")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def tune(cfg: PipelineConfig, *, progress: bool = True, resume: bool = False) -> SearchResult:
    """Run (or resume) the search; returns the table, the best trial and its config file."""
    from ray import tune as rt

    from pipelines.config.load import dump_config
    from pipelines.data.builtin import resolve_builtins
    from pipelines.tracking import runs as tracking
    from pipelines.train.driver import preflight, resolved_paths
    from pipelines.train.ray_cluster import ensure_ray

    section = cfg.tune
    if section is None:
        raise UserError(f"config {cfg.name!r} has no tune: section (see configs/tiny-cpu-tune.yaml)")
    cfg = resolved_paths(resolve_builtins(cfg))
    name = section.name or f"{cfg.name}-tune"
    out_dir = Path(cfg.run.output_dir) / name
    storage = cfg.storage_path()
    exp_path = f"{storage}/{name}"
    if not resume and Path(exp_path).exists():
        raise UserError(f"a search named {name!r} already exists at {exp_path}; pass --resume to continue it "
                        "or set tune.name=...")
    preflight(cfg)
    ensure_ray(cfg)
    parent = None
    if cfg.mlflow.enabled:
        parent = tracking.start_run(cfg.tracking_uri(), cfg.mlflow.experiment, name, {"tune": section.model_dump(mode="json")},
                                    {"lorapipe.kind": "tune"})
    base = cfg.model_dump(mode="json")
    trainable = rt.with_resources(
        rt.with_parameters(trial_fn, base=base, experiment_dir=str(out_dir), parent_run_id=parent),
        {"CPU": 0, "memory": 1})  # a trial's driver only waits; its Train workers hold the CPUs
    if resume:
        if not rt.Tuner.can_restore(exp_path):
            raise UserError(f"nothing to resume at {exp_path}")
        tuner = rt.Tuner.restore(exp_path, trainable=trainable, resume_errored=True, restart_errored=False,
                                 resume_unfinished=True)
    else:
        tuner = rt.Tuner(
            trainable,
            param_space=encode_space(to_ray_space(section)),
            tune_config=rt.TuneConfig(search_alg=build_search(cfg, section), scheduler=build_scheduler(cfg, section),
                                      num_samples=section.num_samples, metric=section.metric, mode=section.mode,
                                      max_concurrent_trials=max_concurrent(cfg, section)),
            run_config=rt.RunConfig(name=name, storage_path=storage, verbose=1 if progress else 0),
        )
    results = tuner.fit()
    rows = trial_rows(results, section, cfg.train.max_steps)
    for row in rows:
        row["run_dir"] = stopped_trial_run_dir(cfg, storage, out_dir, row)
    key, mode = section.metric, section.mode
    if section.rank_by:
        key, mode = rank_by_suite(cfg, rows, section.rank_by)
    scored = [r for r in rows if r.get(key) is not None and r["status"] != "error"]
    if not scored:
        raise RuntimeError(f"no trial of {name} produced {key}; see {exp_path}")
    best = (min if mode == "min" else max)(scored, key=lambda r: r[key])
    out_dir.mkdir(parents=True, exist_ok=True)
    best_cfg = apply_trial_values(cfg, best["params"])
    best_cfg.run.name = None  # `lorapipe train` picks a fresh run name
    best_path = out_dir / "best_config.yaml"
    best_path.write_text(f"# best trial {best['trial_id']} of {name}: {key}={best[key]:.6g}\n"
                         + dump_config(best_cfg))
    table_path = out_dir / "trials.json"
    table_path.write_text(json.dumps([{k: v for k, v in r.items() if k != "history"} for r in rows], indent=2, default=str))
    plot = plot_trials(rows, section.metric, out_dir / "trials.png")
    if parent:
        _log_parent(cfg.tracking_uri(), parent, best, section, [table_path, best_path, plot])
    return SearchResult(exp_path, str(out_dir), rows, best, str(best_path), str(plot) if plot else None, cfg)


def rank_by_suite(cfg: PipelineConfig, rows: list[dict], rank_by: str) -> tuple[str, str]:
    """Evaluate every trial's run directory on the config's eval suite (keep its row limit small):
    row[rank_by] = the suite metric; returns (rank_by, its mode)."""
    from pipelines.config.eval_suite import metric_mode
    from pipelines.eval.run import evaluate
    from pipelines.eval.suite import suite_for_config

    suite = suite_for_config(cfg)
    metric = rank_by.removeprefix("suite:")
    if metric not in suite.metric_names():
        raise UserError(f"tune.rank_by={rank_by!r}: the eval suite computes {', '.join(suite.metric_names())}")
    for row in rows:
        if row.get("run_dir") and RunDir.is_complete(row["run_dir"]):
            row[rank_by] = evaluate(row["run_dir"], suite, record=False).metrics[metric]
    return rank_by, metric_mode(metric)


def _log_parent(uri: str, run_id: str, best: dict, section: TuneSection, files: list) -> None:
    from pipelines.tracking import runs as tracking

    c = tracking.client(uri)
    for f in files:
        if f:
            tracking.with_retries(lambda: c.log_artifact(run_id, str(f)), what="upload tune artifact")
    tracking.log_metrics(uri, run_id, {f"best_{section.metric}": best[section.metric]}, best["steps"])
    for k, v in best["params"].items():
        c.set_tag(run_id, f"best.{k}", str(v))
    tracking.finish_run(uri, run_id)
