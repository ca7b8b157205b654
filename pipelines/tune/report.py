"""The table `lorapipe tune` prints at the end (rich)."""
from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table


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
