"""Quick real run directories for the eval tests: a few real LoRA steps on the tiny base, in this
process, written with the writer training uses (the eval stage reads only the run directory)."""
from __future__ import annotations

from pathlib import Path

from runkit import write_trained_run


def train_task_run(tmp: Path, name: str, *, task: str, steps: int, uri: str, registry: str = "evaltest",
                   max_examples: int = 200, lr: float = 1e-2, quantization: str = "nf4", seed: int = 0,
                   repeat: int = 0, batch: int = 8):
    """A run directory whose adapter learnt `task` (builtin demo rows) for `steps` steps; its
    metrics.json eval_loss is measured on its own held-out split, as training does. repeat=N:
    the data is the task's first row N times (a model that must learn that one answer)."""
    import json

    from pipelines.data.builtin import demo_rows

    data = ["data.path=builtin:demo-tasks", f"data.task={task}", f"data.max_examples={max_examples}"]
    if repeat:
        data_file = tmp / f"{name}-rows.jsonl"
        data_file.write_text((json.dumps(demo_rows(task, n=1, seed=0)[0]) + "\n") * repeat)
        data = [f"data.path={data_file}", "data.task=null", "data.max_examples=null"]
    return write_trained_run(tmp, name, [f"model.quantization={quantization}", f"mlflow.tracking_uri={uri}",
                                         f"registry.name={registry}", "scaling.num_workers=1", *data],
                             steps=steps, lr=lr, batch=batch, seed=seed)
