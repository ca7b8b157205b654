"""Eval suites as data: load a suite (a standalone YAML, a run config's `eval:` section, or the
fallback derived from a run's own data), load and check its rows, and fingerprint it.

The fingerprint is SHA-256 over what decides the numbers: the content of the rows evaluated,
each set's metric definitions and generation settings, and the harness task files (with the
data files they name) and lm-eval version. The gate rules (primary, guards, margins) are not in
it: changing a margin does not invalidate results already computed.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pydantic import ValidationError

from pipelines.config.eval_suite import GENERATION_METRICS, EvalSetSpec, EvalSuite, GoalSpec
from pipelines.core.errors import UserError
from pipelines.core.files import sha256_file

EVAL_FORMAT_VERSION = "1"  # bump when metric code changes what a number means


def suite_from_data(data, source: str) -> EvalSuite:
    from pipelines.config.load import describe_validation_error

    if not isinstance(data, dict) or not data:
        raise UserError(f"eval suite {source} is empty (it needs sets: and primary:)")
    try:
        return EvalSuite.model_validate(data)
    except ValidationError as e:
        raise UserError(f"eval suite {source}: {describe_validation_error(e, EvalSuite)}") from None


def load_suite(path: str | Path) -> EvalSuite:
    """A standalone suite YAML -> EvalSuite (one-line UserError when missing, empty or invalid)."""
    from pipelines.config.load import yaml_load

    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"eval suite file not found: {p}")
    text = p.read_text()
    if not text.strip():
        raise UserError(f"eval suite {p} is empty (it needs sets: and primary:)")
    return suite_from_data(yaml_load(text), str(p))


def default_suite(cfg) -> EvalSuite:
    """A run without an eval section is judged on rows of its own data source (loss, perplexity,
    and exact match for instruction data). Declare a suite to judge on held-out data."""
    d = cfg.data
    metrics = ["loss", "perplexity"] + (["exact_match"] if d.format != "text" else [])
    spec = EvalSetSpec(name=d.task or "data", path=d.path, format=d.format, task=d.task, split=d.split,
                       text_field=d.text_field, max_seq_len=d.max_seq_len, metrics=metrics)
    return EvalSuite(sets=[spec], primary=GoalSpec(metric=f"{spec.name}/loss", mode="min", margin=cfg.registry.margin))


def suite_for_config(cfg, suite_file: Optional[str] = None) -> EvalSuite:
    """--suite FILE, else the config's eval section, else the default suite."""
    if suite_file:
        return load_suite(suite_file)
    if cfg.eval is not None:
        return cfg.eval.suite if cfg.eval.suite is not None else load_suite(cfg.eval.suite_file)
    return default_suite(cfg)


# -- rows ------------------------------------------------------------------------------------
def load_rows(spec: EvalSetSpec) -> list[dict]:
    """At most `limit` rows of the set, each checked for the fields its format needs."""
    if spec.path == "builtin:demo-tasks":
        from pipelines.data.builtin import demo_rows

        rows = demo_rows(spec.task, n=spec.limit, seed=spec.seed)
    elif spec.path.startswith("builtin:"):
        raise UserError(f"eval set {spec.name!r}: path {spec.path!r} is not a builtin; the builtin dataset is "
                        "builtin:demo-tasks")
    else:
        from pipelines.config.schema import DataSection
        from pipelines.data.prepare import load_raw_dataset

        ds = load_raw_dataset(DataSection(path=spec.path, format=spec.format, split=spec.split,
                                          text_field=spec.text_field, max_examples=spec.limit))
        rows = [dict(r) for r in ds]
    for i, row in enumerate(rows, 1):
        check_row(row, i, spec)
    return rows


def check_row(row: dict, row_no: int, spec: EvalSetSpec) -> None:
    def need(key: str, ok: bool) -> None:
        if not ok:
            raise UserError(f"eval set {spec.name!r} ({spec.path}): row {row_no} lacks a non-empty {key!r} "
                            f"(format {spec.format})")

    if spec.format == "alpaca":
        for key in ("instruction", "output"):
            need(key, isinstance(row.get(key), str) and bool(row[key]))
    elif spec.format == "chat":
        msgs = row.get("messages")
        need("messages", isinstance(msgs, list) and bool(msgs) and all(isinstance(m, dict) for m in msgs))
        need("messages[-1] with role assistant", msgs[-1].get("role") == "assistant")
    else:
        need(spec.text_field, isinstance(row.get(spec.text_field), str) and bool(row[spec.text_field]))


def rows_digest(rows: list[dict]) -> str:
    return hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()


# -- harness task files ------------------------------------------------------------------------
def harness_files(include_path: str) -> dict[str, str]:
    """SHA-256 of every task YAML in the folder and of every existing local file they name."""
    from pipelines.config.load import yaml_load

    root = Path(include_path).expanduser()
    if not root.is_dir():
        raise UserError(f"harness include_path {root} is not a folder of lm-eval task YAMLs")
    found: dict[str, str] = {}
    for f in sorted(root.rglob("*.y*ml")):
        found[str(f.relative_to(root))] = sha256_file(f)
        try:
            doc = yaml_load(f.read_text())
        except Exception:  # lm-eval YAMLs may use !function tags; their text is hashed above
            continue
        for value in _strings(doc):
            p = Path(value).expanduser()
            if len(value) < 4096 and p.is_file():
                found[value] = sha256_file(p)
    return found


def _strings(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return []


# -- the prepared suite --------------------------------------------------------------------------
@dataclass(frozen=True)
class PreparedSuite:
    suite: EvalSuite
    rows: dict[str, list[dict]]   # eval set name -> rows
    fingerprint: str
    data_digests: dict[str, str]  # eval set name -> rows digest (MLflow dataset digests)


def prepare_suite(suite: EvalSuite) -> PreparedSuite:
    """Rows loaded and checked, harness tasks found, fingerprint computed: all before any model loads."""
    rows = {s.name: load_rows(s) for s in suite.sets}
    digests = {name: rows_digest(r) for name, r in rows.items()}
    sets = [{**s.model_dump(mode="json", exclude={"path", "split", "seed", "task", "limit"}),
             "generation": s.generation.model_dump(mode="json", exclude={"batch_size"}) if _generates(s) else None,
             "data": digests[s.name]} for s in suite.sets]
    harness = None
    if suite.harness is not None:
        from pipelines.eval.harness import check_tasks, lm_eval_version

        check_tasks(suite.harness)
        harness = {**suite.harness.model_dump(mode="json", exclude={"include_path", "batch_size"}),
                   "files": harness_files(suite.harness.include_path), "lm_eval": lm_eval_version()}
    blob = json.dumps({"format": EVAL_FORMAT_VERSION, "sets": sets, "harness": harness}, sort_keys=True)
    return PreparedSuite(suite, rows, hashlib.sha256(blob.encode()).hexdigest(), digests)


def _generates(spec: EvalSetSpec) -> bool:
    return any(m in GENERATION_METRICS for m in spec.metrics)


def suite_json(suite: EvalSuite) -> str:
    """Compact JSON of a suite (what the registry stores as a model's gate suite)."""
    return json.dumps(suite.model_dump(mode="json", exclude_defaults=True), separators=(",", ":"), sort_keys=True)
