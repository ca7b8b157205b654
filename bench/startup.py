"""Start-up: wall seconds from launching `lorapipe train configs/tiny-cpu.yaml` to the first optimizer step.

The clock starts just before Popen. The first step's absolute time comes from rank 0's first
report (history.jsonl, `startup_first_step_done`); the phases come from metrics.json `startup`.
`cli_s` is what neither records: interpreter start, CLI imports and config loading before the
driver's own clock starts. Builtin assets are materialised into a temp $LORAPIPE_HOME before the
clock starts (the warm case, as after `make demo`); MLflow logs to a throw-away sqlite file.

    python bench/startup.py --repeats 2
    python bench/startup.py --repeats 1 --max-steps 2      # quick: also shortens the run after step 1
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, header, save_figure, spread, write_json  # noqa: E402

PHASES = ("cli_s", "preflight_s", "ray_init_s", "workers_start_s", "data_s", "model_load_s", "deepspeed_init_s",
          "first_step_s")


def breakdown(popen_at: float, run_dir: Path) -> dict:
    """Phases (s) from a finished run directory, with the CLI's share computed from the Popen time."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    first = json.loads((run_dir / "history.jsonl").read_text().splitlines()[0])
    s = dict(metrics["startup"])
    wall = first["startup_first_step_done"] - popen_at
    s["cli_s"] = wall - s["total_to_first_step_s"]
    s["wall_to_first_step_s"] = wall
    return s


def warm_builtins(config: Path, home: Path) -> None:
    """Materialise the config's builtin model and data, as a previous run would have."""
    from pipelines.builtin import resolve_builtins
    from pipelines.config_loader import load_config

    os.environ["LORAPIPE_HOME"] = str(home)
    resolve_builtins(load_config(config))


def run_once(config: Path, work: Path, name: str, overrides: list[str]) -> dict:
    exe = Path(sys.executable).with_name("lorapipe")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
           "LORAPIPE_HOME": str(work / "home")}
    cmd = [str(exe), "train", str(config), f"run.output_dir={work / 'runs'}", f"run.name={name}", *overrides,
           "--no-progress"]
    popen_at = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate()
    total = time.time() - popen_at
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{out[-3000:]}")
    s = breakdown(popen_at, work / "runs" / name)
    s["process_total_s"] = total
    return s


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    med = {p: report["phases_s"][p]["median"] for p in PHASES}
    fig, ax = plt.subplots(figsize=(7, 2.6))
    left = 0.0
    for i, (p, v) in enumerate(med.items()):
        ax.barh([0], [v], left=left, color=plt.cm.tab10(i), label=f"{p[:-2]} {v:.1f}s")
        left += v
    ax.axvline(report["target_s"], color="k", ls="--", lw=1)
    ax.set_yticks([])
    ax.set_xlabel("seconds from Popen to first optimizer step (median run)")
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.35))
    save_figure(fig, path)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny-cpu.yaml"))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-steps", type=int, default=None,
                    help="shorten the run (start-up is unchanged; eval/checkpoint every this many steps)")
    ap.add_argument("--out", default=str(RESULTS / "startup.json"))
    a = ap.parse_args(argv)
    overrides = []
    if a.max_steps:
        m = a.max_steps
        overrides = [f"train.max_steps={m}", f"train.eval_every={m}", f"train.checkpoint_every={m}",
                     f"train.report_every={m}", f"train.warmup_steps={min(1, m - 1)}"]
    work = Path(tempfile.mkdtemp(prefix="lorapipe-bench-startup-"))
    runs = []
    try:
        warm_builtins(Path(a.config), work / "home")
        for i in range(a.repeats):
            runs.append(run_once(Path(a.config), work, f"startup-{i}", overrides))
            print(f"[{i}] {runs[-1]['wall_to_first_step_s']:.1f} s to first step", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = header("startup", vars(a), "workers: 1 each (Ray cpus_per_worker=1)")
    report.update({
        "command": f"lorapipe train {Path(a.config).relative_to(ROOT) if Path(a.config).is_relative_to(ROOT) else a.config} "
                   + " ".join(overrides),
        "wall_to_first_step_s": spread(r["wall_to_first_step_s"] for r in runs),
        "phases_s": {p: spread(r[p] for r in runs) for p in (*PHASES, "total_to_first_step_s", "process_total_s")},
        "target_s": 20.0,
        "runs": runs,
    })
    out = write_json(a.out, report)
    plot(report, out.with_suffix(".png"))
    print(f"start-up median {report['wall_to_first_step_s']['median']:.1f} s -> {out}")
    return report


if __name__ == "__main__":
    main()
