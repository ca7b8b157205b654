"""`lorapipe demo`: the whole pipeline on embedded defaults, on a laptop CPU, in minutes.

1. a tiny Llama (built from config, tokenizer trained locally) is pretrained briefly on the
   generic demo tasks, so the adapter starts from a model that already follows the format;
2. a QLoRA adapter learns a held-out task with 2 Ray workers under DeepSpeed ZeRO-2;
3. the run is registered in MLflow (sqlite; adapter vs merged parity on the eval suite) and
   promoted through the gate on common ground;
4. base, base + adapter and merged are compared on the same eval suite (configs/eval/demo-reverse.yaml).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from rich.console import Console

console = Console()
PRESET = Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml"
TASK = "reverse"
SUITE = Path(__file__).resolve().parents[1] / "configs" / "eval" / "demo-reverse.yaml"


def pretrain_base(out: Path, steps: int, seed: int = 0) -> Path:
    """Full-parameter pretraining of the builtin tiny Llama on the generic tasks (one process),
    with a spinner (whole lines in a log file)."""
    from pipelines.data.builtin import pretrain_tiny_llama

    with console.status("pretraining") as status:
        def progress(step: int, loss: float) -> None:
            line = f"pretraining base: step {step}/{steps}, loss {loss:.3f}"
            status.update(line)
            if not console.is_terminal and step % 100 == 0:
                console.print(line)

        return pretrain_tiny_llama(out, steps, seed, progress)


def before_after(run, suite, uri: str, merged_ref: str) -> list[dict]:
    """Base (4-bit, as training loaded it), base + adapter, and the registered merged model on the
    same suite, through the eval stage (the merged row was computed at registration: cached)."""
    from pipelines.eval.run import evaluate

    rows = []
    for label, target in (("base (4-bit)", f"base:{run.path}"), ("base + QLoRA adapter", str(run.path)),
                          ("merged (registered)", merged_ref)):
        result = evaluate(target, suite, tracking_uri=uri)
        rows.append({"model": label, **result.metrics})
    return rows


def run_demo(workdir: str = ".demo", quick: bool = False) -> int:
    import torch

    from pipelines.config.load import load_config
    from pipelines.eval.commands import print_results
    from pipelines.eval.suite import load_suite
    from pipelines.pipeline import register_and_promote
    from pipelines.train.driver import train

    started = time.time()
    root = Path(workdir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    os.environ["LORAPIPE_HOME"] = str(root / "assets")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    # One thread: tiny matrices gain little from more, and spinning OpenMP threads on a busy
    # 2-core machine slow a step by orders of magnitude.
    torch.set_num_threads(1)

    console.rule("[bold]1/4  base model: tiny Llama from config, tokenizer trained locally, brief pretraining")
    base = pretrain_base(root / "base", steps=120 if quick else 500)
    console.print(f"base model: {base}")

    console.rule("[bold]2/4  QLoRA adapter: 2 Ray workers, DeepSpeed ZeRO-2, 4-bit NF4 base")
    steps = 40 if quick else 300
    cfg = load_config(PRESET, [f"model.path={base}", f"run.output_dir={root / 'runs'}", f"mlflow.tracking_uri={uri}",
                               f"data.task={TASK}", "lora.r=16", "lora.alpha=32", "train.lr=5e-3",
                               f"train.max_steps={steps}", f"train.eval_every={steps // 3}",
                               f"train.checkpoint_every={steps // 2}", "train.report_every=10",
                               f"eval.suite_file={SUITE}"])  # the registered model's gate suite
    run = train(cfg)

    console.rule("[bold]3/4  register in MLflow (adapter vs merged parity on the eval suite), promote through the gate")
    outcome = register_and_promote(run, tracking_uri=uri)
    for line in outcome.lines:
        console.print(line)

    console.rule("[bold]4/4  before/after: `lorapipe eval` of base, base + adapter and merged on the same suite")
    suite = load_suite(SUITE)
    rows = before_after(run, suite, uri, f"models:/{outcome.model_name}/{outcome.version}")
    print_results(rows, f"eval suite {SUITE.name}: held-out '{TASK}' rows (+ a 'copy' guard)")
    (run.path / "demo_before_after.json").write_text(json.dumps(rows, indent=2))
    console.print(f"try it:  MLFLOW_TRACKING_URI={uri} lorapipe eval models:/{outcome.model_name}@champion --json\n"
                  f"         MLFLOW_TRACKING_URI={uri} lorapipe generate models:/{outcome.model_name}@champion "
                  f"--prompt 'Reverse the word.' --input 'a b c'")
    console.print(f"\nsee it:  mlflow ui --backend-store-uri {uri} --port 5000   (then open http://127.0.0.1:5000)")
    console.print(f"run directory: {run.path}\ndemo took {time.time() - started:.0f} s")
    return 0
