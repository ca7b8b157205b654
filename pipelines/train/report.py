"""The table `lorapipe train` prints at the end (rich)."""
from __future__ import annotations

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
