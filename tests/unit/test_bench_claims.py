"""Every figure the benchmark docs quote is held by the results file named next to it.

Scope: bench/README.md from "## Latest figures" on, and README.md's "## Benchmarks" section. A
claim is a table row, a paragraph or a list item; its sources are the `results/<name>.json` files
it names, plus those named by the `###` heading above it. Each plain number in a claim must equal,
up to the number of decimals it is written with, a value of one of its sources (a number in the
JSON, or inside one of its strings, such as the command), as is, as a percentage (when written
with %), or in GiB or MiB. Not figures, so not checked: code spans (commands, settings, targets),
dates and clock times, numbers glued to letters (8B, H100, ZeRO-2, fp32), table header rows and
columns headed "target".
"""
from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"
SCOPES = {"bench/README.md": "## Latest figures", "README.md": "## Benchmarks"}

CITATION = re.compile(r"results/([\w.-]+\.json)")
NUMBER = re.compile(r"(?<![\w.=/-])([-+]?)(\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.(\d+))?(?!\w)(?!\.\d)(%?)")
NOT_FIGURES = [re.compile(p) for p in (
    r"`[^`]*`",                                 # code: commands, settings, targets, file names
    r"\b\d{4}-\d{2}-\d{2}(?:T\d+Z?)?\b",        # dates
    r"\b\d{1,2}:\d{2}(?::\d{2})?\b",            # clock times
)]
LONG_SERIES = 12  # numeric lists longer than this are raw samples (per-step times), never quoted


def section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start:] if end < 0 else text[start:end]


def claims(text: str) -> list[tuple[str, set[str]]]:
    """(claim text, cited result files) for every table row, paragraph and list item."""
    out, heading_sources, para, columns = [], set(), [], None
    lines = text.splitlines()

    def flush():
        if para:
            body = " ".join(para)
            out.append((body, heading_sources | set(CITATION.findall(body))))
            para.clear()

    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("#"):
            flush()
            heading_sources = set(CITATION.findall(stripped))
        elif stripped.startswith("|"):
            flush()
            cells = [c.strip() for c in stripped.strip("|").split("|")]
            nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
            if set(stripped) <= set("|-: "):
                continue  # the separator row
            if re.fullmatch(r"\|[-:| ]+\|", nxt):
                columns = [c.lower() for c in cells]  # a header row names columns, quotes nothing
                continue
            kept = [c for c, name in zip(cells, columns or [""] * len(cells)) if not name.startswith("target")]
            body = " | ".join(kept)
            out.append((body, heading_sources | set(CITATION.findall(stripped))))
        elif not stripped or stripped.startswith("- "):
            flush()
            if stripped:
                para.append(stripped)
        else:
            para.append(stripped)
    flush()
    return out


def figures(text: str) -> list[tuple[str, float, int, bool]]:
    """(as written, value, decimals, is a percentage) for each figure in a claim."""
    for pattern in NOT_FIGURES:
        text = pattern.sub(" ", text)
    text = re.sub(r"(\d+(?:\.\d+)?)-(?=\d+(?:\.\d+)?%)", r"\1% ", text)  # 21-34%: both ends are %
    text = re.sub(r"(?<=\d)-(?=\d)", " ", text)        # ranges: 0.87-0.98
    text = re.sub(r"(?<![\w.])x(?=\d)", "x ", text)    # x1.15
    found = []
    for m in NUMBER.finditer(text):
        sign, whole, frac, pct = m.groups()
        value = float(whole.replace(",", "") + (f".{frac}" if frac else "")) * (-1 if sign == "-" else 1)
        found.append((m.group(0), value, len(frac or ""), pct == "%"))
    return found


@lru_cache(maxsize=None)
def held_values(name: str) -> tuple[float, ...]:
    """Every number a results file holds (numeric leaves and numbers inside its strings)."""
    values: list[float] = []

    def walk(node):
        if isinstance(node, dict):
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            if len(node) > LONG_SERIES and all(isinstance(v, (int, float)) for v in node):
                return
            for v in node:
                walk(v)
        elif isinstance(node, bool) or node is None:
            return
        elif isinstance(node, (int, float)):
            values.append(float(node))
        elif isinstance(node, str):
            values.extend(float(x) for x in re.findall(r"\d+(?:\.\d+)?", node))

    walk(json.loads((RESULTS / name).read_text()))
    return tuple(values)


def is_held(value: float, decimals: int, percent: bool, sources: set[str]) -> bool:
    """The figure rounds from a value of one of its sources (as a %, or in GiB/MiB)."""
    tolerance = 0.5 * 10 ** -decimals * (1 + 1e-9) + 1e-12
    scales = (100.0,) if percent else (1.0, 2.0 ** -30, 2.0 ** -20)
    return any(abs(value - v * s) <= tolerance for name in sources for v in held_values(name) for s in scales)


def unbacked(text: str) -> list[str]:
    """Every figure in `text` (a benchmark doc's section) that no cited results file holds."""
    problems = []
    for body, sources in claims(text):
        missing = sorted(s for s in sources if not (RESULTS / s).is_file())
        if missing:
            problems.append(f"cites missing {missing}: {body[:120]}")
            continue
        for written, value, decimals, percent in figures(body):
            if not sources:
                problems.append(f"{written!r} cites no results file: {body[:120]}")
            elif not is_held(value, decimals, percent, sources):
                problems.append(f"{written!r} is in none of {sorted(sources)}: {body[:120]}")
    return problems


@pytest.mark.parametrize("doc", sorted(SCOPES))
def test_every_quoted_figure_is_held_by_its_results_file(doc):
    full = (ROOT / doc).read_text()
    assert SCOPES[doc] in full, f"{doc} has no {SCOPES[doc]!r} section to check"
    text = section(full, SCOPES[doc])
    assert claims(text), f"no claims found in {doc}"
    assert unbacked(text) == []


BENCH_SECTION = """### 1. Pipeline efficiency (`results/pipeline_efficiency.json`)

**Ratio lorapipe/bare (median/median) = 0.951**, per pair 0.867-0.984, collate 0.5% of a step.
"""


def test_a_figure_the_file_holds_passes():
    assert unbacked(BENCH_SECTION) == []


@pytest.mark.parametrize("wrong,expected", [
    ("0.951", "0.959"),    # a figure from a run that was not kept
    ("0.867", "0.875"),    # a mis-copied range end
    ("0.5%", "5%"),        # a percentage off by its scale
])
def test_a_figure_no_file_holds_fails(wrong, expected):
    problems = unbacked(BENCH_SECTION.replace(wrong, expected))
    assert len(problems) == 1 and repr(expected.rstrip("%") + ("%" if "%" in expected else "")) in problems[0]


def test_a_figure_without_a_cited_file_fails():
    problems = unbacked("Start-up took 19.9 s on a good day.\n")
    assert problems and "cites no results file" in problems[0]


def test_a_figure_in_another_file_than_the_one_cited_fails():
    # 0.437 s is ZeRO-2's step in zero_overhead.json, not a figure of pipeline_efficiency.json.
    assert unbacked("ZeRO-2 step 0.437 s (`results/pipeline_efficiency.json`).\n")
    assert not unbacked("ZeRO-2 step 0.437 s (`results/zero_overhead.json`).\n")


def test_settings_targets_dates_and_names_are_not_figures():
    text = "On 2026-12-02 at 05:41, `--steps 48`, target `>= 0.95`, ZeRO-2 on an H100 with 8B, r=16.\n"
    assert figures(text) == []


def test_gib_and_percent_scales():
    # floor_gib 1.946 -> "1.95"; activations 355991552 bytes -> 0.33 GiB; share 0.3403 -> "34%".
    assert not unbacked("Floor 1.95 GiB, activations 0.33 (`results/qlora_memory.json`).\n")
    assert not unbacked("34% of the grid's steps (`results/tune_efficiency.json`).\n")
    assert unbacked("0.34% of the grid's steps (`results/tune_efficiency.json`).\n")
