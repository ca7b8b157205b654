"""The promotion gate's yardstick and rule. A registered model's gate suite is the one suite every
promotion of it is judged on: set at its first registration (from the run config's `eval:` section, or the default suite), kept as
registered-model tags (the suite and its fingerprint), changed only by `lorapipe registry
set-gate NAME --suite FILE`."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

from pipelines.config.eval_suite import EvalSuite
from pipelines.core.errors import UserError
from pipelines.eval.suite import suite_from_data, suite_json
from pipelines.tracking.runs import with_retries

SUITE_TAG = "lorapipe.gate_suite"
FINGERPRINT_TAG = "lorapipe.gate_suite_fingerprint"


@dataclass(frozen=True)
class GateSuite:
    suite: EvalSuite
    fingerprint: str


def gate_suite(c, name: str) -> Optional[GateSuite]:
    from mlflow.exceptions import MlflowException

    try:
        tags = c.get_registered_model(name).tags or {}
    except MlflowException:
        raise UserError(f"no registered model named {name!r}") from None
    if SUITE_TAG not in tags:
        return None
    return GateSuite(suite_from_data(json.loads(tags[SUITE_TAG]), f"(gate of {name})"), tags[FINGERPRINT_TAG])


def set_gate_suite(c, name: str, suite: EvalSuite, fingerprint: str) -> None:
    text = suite_json(suite)
    if len(text) > 5000:  # MLflow's tag value limit
        raise UserError(f"the gate suite for {name} is {len(text)} characters as JSON; at most 5000 fit in a tag "
                        "(fewer sets or guards)")
    with_retries(lambda: c.set_registered_model_tag(name, SUITE_TAG, text), what="set gate suite")
    with_retries(lambda: c.set_registered_model_tag(name, FINGERPRINT_TAG, fingerprint), what="set gate suite")


def verdict(suite: EvalSuite, candidate: dict, holder: dict) -> tuple[bool, list[str]]:
    """(passes, reasons): the primary metric must beat the holder by more than the margin, and
    no guard may be worse than the holder's by more than its tolerance."""
    p = suite.primary
    c, h = candidate[p.metric], holder[p.metric]
    gain = (h - c) if p.mode == "min" else (c - h)
    reasons = []
    if not gain > p.margin:
        reasons.append(f"{p.metric} {c:.6g} vs {h:.6g}: needs to be {'lower' if p.mode == 'min' else 'higher'} "
                       f"by more than {p.margin:g}")
    for g in suite.guards:
        c, h = candidate[g.metric], holder[g.metric]
        loss = (c - h) if g.mode == "min" else (h - c)
        if loss > g.tolerance:
            reasons.append(f"guard {g.metric} {c:.6g} vs {h:.6g}: worse by {loss:.3g} > tolerance {g.tolerance:g}")
    return not reasons, reasons
