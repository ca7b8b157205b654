"""An ablation's results as the literature prints them: a Markdown table in the form of the
classic LoRA tables, the CSV behind it (fixed column names), and a plot of accuracy and
perplexity against trainable parameters (log axis) with full fine-tuning as a reference line.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Callable, Optional

CSV_COLUMNS = ("value", "trainable_params", "trainable_pct", "accuracy", "perplexity", "eval_loss",
               "peak_memory_bytes", "train_seconds")
FULL = "full"


def _count(x) -> str:
    return f"{int(x):,}"


def _pct(x) -> str:
    return f"{x:.2f}%" if x >= 0.1 else f"{x:.3f}%"


def _acc(x) -> str:
    return f"{100 * x:.1f}%"


def _num(x) -> str:
    return f"{x:.3f}" if x < 100 else f"{x:,.1f}"


def _mib(x) -> str:
    return f"{x / 2**20:,.0f} MiB"


def _secs(x) -> str:
    return f"{x:.1f} s"


# (header, CSV column, format). Each kind leads with the columns of its classic table.
COLUMNS: dict[str, tuple[str, str, Callable]] = {
    "trainable_params": ("Trainable Params", "trainable_params", _count),
    "trainable_pct": ("Trainable %", "trainable_pct", _pct),
    "accuracy": ("Accuracy", "accuracy", _acc),
    "perplexity": ("Perplexity", "perplexity", _num),
    "eval_loss": ("Eval Loss", "eval_loss", _num),
    "peak_memory_bytes": ("Peak Memory", "peak_memory_bytes", _mib),
    "train_seconds": ("Training Time", "train_seconds", _secs),
}
FIRST_HEADER = {"rank": "Rank", "targets": "Target Modules", "method": "Method", "variant": "Variant"}
ORDER = {
    "rank": ("trainable_pct", "accuracy", "perplexity", "trainable_params", "eval_loss", "peak_memory_bytes",
             "train_seconds"),
    "method": ("peak_memory_bytes", "accuracy", "train_seconds", "perplexity", "eval_loss", "trainable_params",
               "trainable_pct"),
    "targets": ("trainable_params", "accuracy", "perplexity", "trainable_pct", "eval_loss", "peak_memory_bytes",
                "train_seconds"),
    "variant": ("accuracy", "perplexity", "eval_loss", "trainable_params", "trainable_pct", "peak_memory_bytes",
                "train_seconds"),
}


def csv_text(rows: list[dict]) -> str:
    """One line per value with the named columns (a failed trial: its value, the rest empty)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: ("" if row.get(k) is None else row[k]) for k in CSV_COLUMNS})
    return buf.getvalue()


def value_label(kind: str, row: dict) -> str:
    """The first cell: the value, with the modules a targets preset resolved to."""
    label = "full fine-tuning" if row["value"] == FULL and kind != "method" else row["value"]
    if kind == "targets" and row.get("modules"):
        label += f" ({', '.join(row['modules'])})"
    return label


def markdown_table(kind: str, rows: list[dict]) -> str:
    keys = ORDER[kind]
    lines = ["| " + " | ".join([FIRST_HEADER[kind], *(COLUMNS[k][0] for k in keys)]) + " |",
             "|" + "---|" * (len(keys) + 1)]
    for row in rows:
        if row.get("status") != "completed":
            cells = [f"{row.get('status', 'error')}"] + [""] * (len(keys) - 1)
        else:
            cells = [COLUMNS[k][2](row[k]) if row.get(k) is not None else "-" for k in keys]
        lines.append("| " + " | ".join([value_label(kind, row), *cells]) + " |")
    return "\n".join(lines) + "\n"


def _finite(rows: list[dict], key: str) -> list[dict]:
    return [r for r in rows if r.get(key) is not None and math.isfinite(r[key]) and r.get("trainable_params")]


def plot_ablation(kind: str, rows: list[dict], out: Path, title: str) -> Optional[Path]:
    """Accuracy and perplexity against trainable parameters (log x); full fine-tuning as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "accuracy", "accuracy (exact match)"), (axes[1], "perplexity", "perplexity")):
        points = [r for r in _finite(rows, key) if r["value"] != FULL or kind == "method"]
        if points:
            xs = [r["trainable_params"] for r in points]
            ys = [r[key] for r in points]
            ax.plot(xs, ys, marker="o", linestyle="-" if kind == "rank" else "none")
            for r, x, y in zip(points, xs, ys):
                ax.annotate(r["value"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        full = next((r for r in _finite(rows, key) if r["value"] == FULL), None)
        if full is not None:
            ax.axhline(full[key], color="gray", linestyle="--", label="full fine-tuning")
            ax.legend(fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
