"""Search efficiency: exhaustive grid vs ASHA + Optuna TPE on the same search space.

Both searches are real `lorapipe tune` runs (pipelines.tune.search.tune: one Ray Train run per trial, 1
worker, 2 trials at a time on this 2-core box) over the tiny preset's space: LoRA rank {4, 8, 16},
alpha/rank {1, 2}, learning rate log-uniform [1e-3, 2e-2] (3 grid points: 18 grid trials). The grid
trains every trial to max_steps; ASHA+TPE samples `--samples` trials and stops weak ones at rungs.

Reported per method: training steps used (sum over trials of the last reported step), wall
seconds, and the best trial's final eval loss. ASHA+TPE repeats with different search seeds (the
training seed, hence data split and init, stays fixed so eval losses are comparable).
Target: ASHA+TPE's best within 2% of the grid's best, using at most 35% of the grid's steps.

    python bench/tune_efficiency.py --repeats 3                 # ~15 min here
    python bench/tune_efficiency.py --max-steps 12 --samples 4 --repeats 1 --grid-lr-points 2   # smoke
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, header, save_figure, spread, write_json  # noqa: E402

TARGET_LOSS_GAP, TARGET_STEP_SHARE = 0.02, 0.35


def search_config(work: Path, a, *, grid: bool, search_seed: int):
    """configs/tiny-cpu-tune.yaml with a longer run (so early stopping has steps to save), an eval
    at every rung, and the method's search settings; no MLflow (not what is measured)."""
    from pipelines.config.load import load_config

    rung = a.grace
    common = [f"run.output_dir={work / 'runs'}", f"run.storage_path={work / 'ray'}", "mlflow.enabled=false",
              f"train.max_steps={a.max_steps}", f"train.eval_every={rung}", f"train.report_every={rung}",
              f"train.checkpoint_every={a.max_steps}", f"tune.asha.grace_period={rung}",
              f"tune.asha.reduction_factor={a.reduction_factor}", f"tune.grid_points={a.grid_lr_points}",
              f"tune.seed={search_seed}"]
    if grid:
        return load_config(ROOT / "configs" / "tiny-cpu-tune.yaml", [
            *common, "tune.search=grid", "tune.num_samples=1", "tune.asha.enabled=false", "tune.name=grid"])
    return load_config(ROOT / "configs" / "tiny-cpu-tune.yaml", [
        *common, "tune.search=optuna", f"tune.num_samples={a.samples}", f"tune.name=asha_tpe_{search_seed}"])


def run_search(cfg) -> dict:
    from pipelines.tune.search import tune

    t0 = time.time()
    result = tune(cfg, progress=False)
    wall = time.time() - t0
    rows = result.rows
    return {"wall_s": wall, "trials": len(rows), "steps": sum(r["steps"] for r in rows),
            "best_eval_loss": result.best["eval_loss"], "best_params": result.best["params"],
            "stopped_early": sum(r["status"] == "stopped early" for r in rows),
            "trials_table": [{k: r[k] for k in ("trial_id", "params", "eval_loss", "steps", "status")} for r in rows],
            "curves": [r["history"] for r in rows]}


def plot(report: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    runs = [("grid", report["grid"])] + [(f"ASHA+TPE seed {r['search_seed']}", r) for r in report["asha_tpe"]]
    for label, run in runs:
        # Best eval loss found so far against training steps spent, trials in table order.
        spent, best, xs, ys = 0, float("inf"), [], []
        for row in run["trials_table"]:
            spent += row["steps"]
            if row["eval_loss"] is not None and row["status"] == "completed":
                best = min(best, row["eval_loss"])
            xs.append(spent)
            ys.append(best)
        left.step(xs, ys, where="post", label=label, lw=2 if label == "grid" else 1)
    left.set_xlabel("training steps used (cumulative)")
    left.set_ylabel("best completed eval loss")
    left.set_title("best eval loss vs steps spent")
    left.legend(fontsize=8)
    names = [label for label, _ in runs]
    right.bar(names, [run["steps"] for _, run in runs], color=["#555"] + ["#3a7"] * (len(runs) - 1))
    right.axhline(TARGET_STEP_SHARE * report["grid"]["steps"], ls="--", c="r", label="35% of grid steps")
    right.set_ylabel("training steps used")
    right.tick_params(axis="x", labelrotation=20, labelsize=8)
    right.legend(fontsize=8)
    return save_figure(fig, out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="ASHA+TPE searches (search seeds 0..N-1)")
    ap.add_argument("--samples", type=int, default=12, help="ASHA+TPE trials per search")
    ap.add_argument("--max-steps", type=int, default=48)
    ap.add_argument("--grace", type=int, default=6, help="ASHA grace period = eval/report interval")
    ap.add_argument("--reduction-factor", type=float, default=3.0)
    ap.add_argument("--grid-lr-points", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS / "tune_efficiency.json"))
    a = ap.parse_args(argv)

    import ray

    work = Path(tempfile.mkdtemp(prefix="lp-tune-bench-"))
    os.environ["LORAPIPE_HOME"] = os.environ.get("LORAPIPE_HOME", str(ROOT / ".lorapipe"))
    try:
        grid = run_search(search_config(work, a, grid=True, search_seed=0))
        asha = [{"search_seed": seed, **run_search(search_config(work, a, grid=False, search_seed=seed))}
                for seed in range(a.repeats)]
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    gaps = [r["best_eval_loss"] / grid["best_eval_loss"] - 1 for r in asha]
    shares = [r["steps"] / grid["steps"] for r in asha]
    report = {**header("tune_efficiency", vars(a), None), "grid": grid, "asha_tpe": asha, "summary": {
        "grid_steps": grid["steps"], "grid_best_eval_loss": grid["best_eval_loss"], "grid_wall_s": grid["wall_s"],
        "asha_steps": spread([r["steps"] for r in asha]), "asha_wall_s": spread([r["wall_s"] for r in asha]),
        "asha_best_eval_loss": spread([r["best_eval_loss"] for r in asha]),
        "loss_gap_vs_grid": spread(gaps), "step_share_of_grid": spread(shares),
        "target": f"best within {TARGET_LOSS_GAP:.0%} of grid using <= {TARGET_STEP_SHARE:.0%} of its steps",
        "target_met_in": f"{sum(g <= TARGET_LOSS_GAP and s <= TARGET_STEP_SHARE for g, s in zip(gaps, shares))}"
                         f" of {len(asha)} searches"}}
    out = write_json(a.out, report)
    png = plot(report, out.with_suffix(".png"))
    s = report["summary"]
    print(f"grid: {grid['trials']} trials, {grid['steps']} steps, {grid['wall_s']:.0f}s, best {grid['best_eval_loss']:.4f}")
    for r, g, sh in zip(asha, gaps, shares):
        print(f"ASHA+TPE seed {r['search_seed']}: {r['trials']} trials ({r['stopped_early']} stopped), {r['steps']} "
              f"steps ({sh:.0%} of grid), {r['wall_s']:.0f}s, best {r['best_eval_loss']:.4f} ({g:+.1%} vs grid)")
    print(f"target met in {s['target_met_in']}; {out}, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
