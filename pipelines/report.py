"""Tables printed at the end of commands (rich)."""
from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table


def print_train_summary(run) -> None:
    m, lin = run.metrics(), run.lineage()
    t = Table(title=f"run {run.path.name}", show_header=False)
    t.add_column("", style="bold")
    t.add_column("")
    rows = [
        ("run directory", str(run.path)),
        ("steps", str(m["train_steps"])),
        ("train loss", f"{m['train_loss']:.4f}"),
        ("eval loss", f"{m['eval_loss']:.4f}"),
        ("eval perplexity", f"{m['eval_perplexity']:.3f}"),
        ("tokens/s", f"{m['tokens_per_s']:,.0f}"),
        ("peak memory", f"{m['peak_memory_bytes'] / 2**20:,.0f} MiB"),
        ("MLflow run", str(lin.get("mlflow_run_id"))),
    ]
    for k, v in rows:
        t.add_row(k, v)
    Console().print(t)


def print_tune_summary(result) -> None:
    metric = next(k for k in result.best if k not in ("trial_id", "params", "steps", "status", "history", "run_dir"))
    t = Table(title=f"search {Path(result.experiment_path).name}: {len(result.rows)} trials")
    for col in ("trial", "params", metric, "steps", "status"):
        t.add_column(col)
    for r in sorted(result.rows, key=lambda r: (r[metric] is None, r[metric] or 0.0)):
        star = " *" if r["trial_id"] == result.best["trial_id"] else ""
        params = ", ".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in r["params"].items())
        value = f"{r[metric]:.4f}" if r[metric] is not None else "-"
        t.add_row(r["trial_id"] + star, params, value, str(r["steps"]), r["status"])
    Console().print(t)
    Console().print(f"best config: {result.best_config_path}\n  train it:  lorapipe train {result.best_config_path}")
    if result.plot_path:
        Console().print(f"plot: {result.plot_path}")


def _short(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)
