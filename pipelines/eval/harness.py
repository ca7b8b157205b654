"""lm-evaluation-harness tasks from local task YAMLs, run on the very model object the rest of
the suite uses (HFLM takes a loaded model + tokenizer: a 4-bit base with its PEFT adapter, or a
merged model). Nothing is fetched from a hub: the task YAMLs name local data files."""
from __future__ import annotations

from pipelines.core.errors import UserError


def lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def task_manager(spec):
    from lm_eval.tasks import TaskManager

    # include_defaults=False: only the user's folder is indexed (fast, and no hub task sneaks in).
    return TaskManager(include_path=str(spec.include_path), include_defaults=False)


def check_tasks(spec) -> None:
    """Every task the suite names is defined in its include_path (one line otherwise)."""
    from pathlib import Path

    if not Path(spec.include_path).expanduser().is_dir():
        raise UserError(f"harness include_path {spec.include_path} is not a folder of lm-eval task YAMLs")
    known = set(task_manager(spec).all_tasks)
    missing = [t for t in spec.tasks if t not in known]
    if missing:
        raise UserError(f"harness task {missing[0]!r} not found in {spec.include_path} "
                        f"(defined there: {', '.join(sorted(known)) or 'none'})")


def harness_metrics(model, tokenizer, spec) -> dict[str, float]:
    """{"harness/<task>/<metric>": value}; stderr entries are left out."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=spec.batch_size)
    result = simple_evaluate(model=lm, tasks=list(spec.tasks), task_manager=task_manager(spec), limit=spec.limit,
                             num_fewshot=spec.num_fewshot, log_samples=False, bootstrap_iters=0)
    out = {}
    for task, values in result["results"].items():
        for key, value in values.items():
            metric = key.split(",")[0]
            if isinstance(value, (int, float)) and not metric.endswith("_stderr") and metric != "sample_len":
                out[f"harness/{task}/{metric}"] = float(value)
    return out
