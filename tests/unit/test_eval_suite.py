"""Eval suites: the schema's one-line refusals, the shipped suites, the fingerprint, the gate rule."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.config.eval_suite import EvalSuite
from pipelines.core.errors import UserError
from pipelines.eval.gate import verdict
from pipelines.eval.suite import load_suite, prepare_suite, suite_from_data

ROOT = Path(__file__).resolve().parents[2]
SUITES = sorted((ROOT / "configs" / "eval").glob("*.yaml"))


def suite(**overrides) -> dict:
    base = {"sets": [{"name": "rev", "path": "builtin:demo-tasks", "task": "reverse", "limit": 8,
                      "metrics": ["loss", "exact_match"]}],
            "primary": {"metric": "rev/loss", "mode": "min"}}
    base.update(overrides)
    return base


@pytest.mark.parametrize("path", SUITES, ids=lambda p: p.name)
def test_every_shipped_suite_validates_and_fingerprints(path):
    prepared = prepare_suite(load_suite(path))
    assert len(prepared.fingerprint) == 64 and all(prepared.rows.values())


def one_line_error(fn) -> str:
    with pytest.raises(UserError) as e:
        fn()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_bad_suites_are_one_line(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("\n")
    bad_rows = tmp_path / "rows.jsonl"
    bad_rows.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n" + json.dumps({"instruction": "c"}) + "\n")
    cases = [
        (lambda: load_suite(tmp_path / "nope.yaml"), "not found"),
        (lambda: load_suite(empty), "is empty"),
        (lambda: suite_from_data(suite(sets=[{**suite()["sets"][0], "metrics": ["bleu"]}]), "s"), "bleu"),
        (lambda: suite_from_data(suite(primary={"metric": "rev/rouge_l", "mode": "max"}), "s"), "not computed"),
        (lambda: suite_from_data(suite(sets=[{**suite()["sets"][0], "generation": {"temperature": 0}}]), "s"),
         "temperature"),
        (lambda: suite_from_data(suite(sets=[{**suite()["sets"][0], "generation": {"max_new_tokens": 0}}]), "s"),
         "max_new_tokens"),
        (lambda: prepare_suite(EvalSuite.model_validate(suite(sets=[{"name": "f", "path": str(bad_rows),
                                                                     "metrics": ["loss"]}],
                                                              primary={"metric": "f/loss", "mode": "min"}))),
         "row 2 lacks a non-empty 'output'"),
    ]
    for fn, expected in cases:
        assert expected in one_line_error(fn)


def test_harness_task_not_found_is_one_line(tmp_path):
    (tmp_path / "t.yaml").write_text("task: here\ndataset_path: json\noutput_type: loglikelihood\n"
                                     "doc_to_text: q\ndoc_to_target: a\n")
    data = suite(harness={"include_path": str(tmp_path), "tasks": ["missing_task"]})
    msg = one_line_error(lambda: prepare_suite(EvalSuite.model_validate(data)))
    assert "'missing_task' not found" in msg and "here" in msg


def test_fingerprint_follows_data_and_metrics_not_gate_rules(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"instruction": "Repeat.", "output": w}) + "\n" for w in ("a", "b", "c")))
    spec = {"sets": [{"name": "f", "path": str(rows), "metrics": ["loss"]}], "primary": {"metric": "f/loss", "mode": "min"}}
    first = prepare_suite(EvalSuite.model_validate(spec)).fingerprint
    assert prepare_suite(EvalSuite.model_validate(spec)).fingerprint == first
    stricter = {**spec, "primary": {"metric": "f/loss", "mode": "min", "margin": 0.5}}
    assert prepare_suite(EvalSuite.model_validate(stricter)).fingerprint == first  # gate rules: same results
    more = {**spec, "sets": [{**spec["sets"][0], "metrics": ["loss", "perplexity"]}]}
    assert prepare_suite(EvalSuite.model_validate(more)).fingerprint != first
    rows.write_text(rows.read_text().replace('"c"', '"d"'))
    assert prepare_suite(EvalSuite.model_validate(spec)).fingerprint != first


def test_gate_rule_primary_margin_and_guard_tolerance():
    s = EvalSuite.model_validate(suite(primary={"metric": "rev/loss", "mode": "min", "margin": 0.1},
                                       guards=[{"metric": "rev/exact_match", "mode": "max", "tolerance": 0.05}]))
    holder = {"rev/loss": 2.0, "rev/exact_match": 0.5}
    assert verdict(s, {"rev/loss": 1.8, "rev/exact_match": 0.46}, holder) == (True, [])
    ok, reasons = verdict(s, {"rev/loss": 1.95, "rev/exact_match": 0.5}, holder)  # better, not by the margin
    assert not ok and "rev/loss" in reasons[0]
    ok, reasons = verdict(s, {"rev/loss": 1.0, "rev/exact_match": 0.4}, holder)  # guard regressed by 0.1
    assert not ok and reasons == [r for r in reasons if r.startswith("guard rev/exact_match")]


def test_config_eval_section_and_tune_rank_by(tmp_path):
    from pipelines.config.load import load_config

    cfg = load_config(ROOT / "configs" / "tiny-cpu.yaml", ["eval.suite_file=configs/eval/demo-reverse.yaml"])
    assert cfg.eval.suite_file.endswith("demo-reverse.yaml")
    with pytest.raises(UserError, match="exactly one"):
        load_config(ROOT / "configs" / "tiny-cpu.yaml", ["eval={}"])
    with pytest.raises(UserError, match="needs an eval"):
        load_config(ROOT / "configs" / "tiny-cpu-tune.yaml", ["tune.rank_by=suite:reverse/exact_match"])
