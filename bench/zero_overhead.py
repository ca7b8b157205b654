"""Where pipeline_efficiency's gap comes from: the same step without Ray, in one process.

Same ~19M Llama, LoRA config, batches and torch AdamW as bench/pipeline_efficiency.py, one torch
thread: the bare PEFT loop vs lorapipe's own model + DeepSpeed engine (pipelines.train.worker
build_model/build_engine) at ZeRO stage 0 and stage 2 (gloo, world size 1). Median step seconds
after warm-up, methods interleaved over repeats.

    python bench/zero_overhead.py --repeats 3 --steps 20
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, SHAPE_20M, header, save_llama, spread, write_json  # noqa: E402


def engine_step_s(cfg, batches: list, stage: int, warmup: int) -> float:
    import torch

    from pipelines.train.worker import build_engine, build_model

    cfg = cfg.model_copy(deep=True)
    cfg.deepspeed.stage = stage
    torch.manual_seed(cfg.seed)
    model, _ = build_model(cfg, torch.device("cpu"))
    engine = build_engine(cfg, model)
    engine.train()
    times = []
    for batch in batches:
        t0 = time.perf_counter()
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        loss.item()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[warmup:])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "zero_overhead.json"))
    a = ap.parse_args(argv)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29533"), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    import torch

    torch.set_num_threads(1)
    import pipeline_efficiency as pe

    work = Path(tempfile.mkdtemp(prefix="lorapipe-bench-zero-"))
    model_dir = save_llama(work / "model", **SHAPE_20M)
    cfg = pe.run_config(model_dir, work / "runs", "zero", a)
    batches, _ = pe.bare_batches(cfg, a.steps)
    steps: dict[str, list[float]] = {"bare": [], "zero0": [], "zero2": []}
    for rep in range(a.repeats):
        steps["bare"].append(statistics.median(pe.bare_run(cfg, batches, a.warmup)["step_s"]["values"]))
        for stage in (0, 2):
            steps[f"zero{stage}"].append(engine_step_s(cfg, batches, stage, a.warmup))
        print(rep, {k: [round(x, 4) for x in v] for k, v in steps.items()}, flush=True)
    bare = statistics.median(steps["bare"])
    report = {**header("zero_overhead", vars(a), 1), "step_s": {k: spread(v) for k, v in steps.items()},
              "step_time_over_bare": {k: statistics.median(v) / bare for k, v in steps.items()}}
    out = write_json(a.out, report)
    print({k: round(v, 3) for k, v in report["step_time_over_bare"].items()}, "->", out)
    return report


if __name__ == "__main__":
    main()
