"""The README's ablation tables are the ones `lorapipe ablate` wrote (bench/results/ablate/<kind>/),
and those files agree with each other: the Markdown is the CSV's rows, formatted."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest

from pipelines.ablate.table import CSV_COLUMNS, markdown_table

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results" / "ablate"


def table_lines(md: str) -> list[str]:
    return [line for line in md.splitlines() if line.startswith("|")]


@pytest.mark.parametrize("kind", ["rank", "targets", "method", "variant"])
def test_readme_shows_the_table_the_command_wrote(kind):
    written = table_lines((RESULTS / kind / "table.md").read_text())
    readme = (ROOT / "README.md").read_text()
    assert "\n".join(written) in readme
    assert f"lorapipe ablate {kind} configs/tiny-cpu-ablate.yaml" in readme
    assert (RESULTS / kind / "plot.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("kind", ["rank", "targets", "method", "variant"])
def test_markdown_is_the_csv_formatted(kind):
    rows = list(csv.DictReader((RESULTS / kind / "table.csv").open()))
    assert tuple(rows[0]) == CSV_COLUMNS
    typed = [{"value": r["value"], "status": "completed", **{k: float(r[k]) for k in CSV_COLUMNS[1:]}} for r in rows]
    written = table_lines((RESULTS / kind / "table.md").read_text())
    if kind == "targets":  # the Markdown adds the resolved module names to each preset
        written = [line.split(" (", 1)[0] + " |" + line.split(") |", 1)[1] if " (" in line else line
                   for line in written]
    assert table_lines(markdown_table(kind, typed)) == written
