"""Start-up: wall seconds from launching `lorapipe train configs/tiny-cpu.yaml` to the first optimizer step.

Two cases, as users meet them:
- own: no Ray running; `lorapipe train` starts a local Ray and stops it (a laptop, a first try);
- running: a `ray start --head` is already up and has run one job (any real cluster, or a
  workstation where Ray was started once); `lorapipe train` joins it, as it does on its own
  when RAY_ADDRESS is unset and `ray start` ran on this machine.
Each run gets its own RAY_TMPDIR, so a cluster the user has running here is never joined.

The clock starts just before Popen. The first step's absolute time comes from rank 0's first
report (history.jsonl, `startup_first_step_done`); the phases come from metrics.json `startup`.
`cli_s` is what neither records: interpreter start, CLI imports and config loading before the
driver's own clock starts. Builtin assets are materialised into a temp $LORAPIPE_HOME before the
clock starts (the warm case, as after `make demo`); MLflow logs to a throw-away sqlite file.

    python bench/startup.py --repeats 2
    python bench/startup.py --repeats 1 --max-steps 2 --cluster own   # quick: also shortens the run
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
from common import RESULTS, ROOT, RayHead, header, save_figure, spread, write_json  # noqa: E402

CASES = ("own", "running")
CASE_LABELS = {"own": "own Ray (cold)", "running": "Ray already running"}
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
    from pipelines.config.load import load_config
    from pipelines.data.builtin import resolve_builtins

    os.environ["LORAPIPE_HOME"] = str(home)
    resolve_builtins(load_config(config))


def run_once(config: Path, work: Path, name: str, overrides: list[str], env: dict) -> dict:
    exe = Path(sys.executable).with_name("lorapipe")
    env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", "LORAPIPE_HOME": str(work / "home")}
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
    s["joined_running_cluster"] = "ray: joining the cluster already running" in out
    return s


def own_cluster_env(ray_tmp: Path) -> dict:
    """No cluster to join: an empty RAY_TMPDIR of its own (a user's `ray start` stays out of it)."""
    return {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_TMPDIR": str(ray_tmp)}


def runs_of(case: str, a, work: Path, overrides: list[str]) -> list[dict]:
    """`a.repeats` timed runs; on a running cluster, after one untimed run (a cluster in use has
    run jobs before: Ray Train's long-lived helpers already exist)."""
    def timed(env: dict, expect_join: bool) -> list[dict]:
        runs = []
        for i in range(a.repeats):
            runs.append(run_once(Path(a.config), work, f"{case}-{i}", overrides, env))
            assert runs[-1]["joined_running_cluster"] == expect_join, f"{case}: joined={not expect_join}"
            print(f"[{case} {i}] {runs[-1]['wall_to_first_step_s']:.1f} s to first step", flush=True)
        return runs

    if case == "own":
        ray_tmp = Path(tempfile.mkdtemp(prefix="lpr-"))  # short: Ray's socket paths must stay < 108 chars
        try:
            return timed(own_cluster_env(ray_tmp), expect_join=False)
        finally:
            shutil.rmtree(ray_tmp, ignore_errors=True)
    with RayHead(num_cpus=os.cpu_count() or 2) as head:
        run_once(Path(a.config), work, f"{case}-warmup", overrides, head.env())
        return timed(head.env(), expect_join=True)


def summary(runs: list[dict]) -> dict:
    return {"wall_to_first_step_s": spread(r["wall_to_first_step_s"] for r in runs),
            "phases_s": {p: spread(r[p] for r in runs) for p in (*PHASES, "total_to_first_step_s", "process_total_s")},
            "runs": runs}


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [c for c in CASES if c in report["cases"]]
    fig, ax = plt.subplots(figsize=(7.5, 1.4 + 0.7 * len(cases)))
    for y, case in enumerate(cases):
        left = 0.0
        for i, p in enumerate(PHASES):
            v = report["cases"][case]["phases_s"][p]["median"]
            ax.barh([y], [v], left=left, color=plt.cm.tab10(i), label=p[:-2] if y == 0 else None)
            ax.text(left + v / 2, y, f"{v:.1f}", ha="center", va="center", fontsize=6)
            left += v
    ax.axvline(report["target_s"], color="k", ls="--", lw=1)
    ax.set_yticks(range(len(cases)), [CASE_LABELS[c] for c in cases], fontsize=8)
    ax.set_xlabel("seconds from Popen to first optimizer step (median run per phase)")
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.45))
    save_figure(fig, path)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny-cpu.yaml"))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--cluster", choices=(*CASES, "both"), default="both",
                    help="own: lorapipe starts its own Ray; running: a `ray start` head is already up")
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
    cases = {}
    try:
        warm_builtins(Path(a.config), work / "home")
        for case in (CASES if a.cluster == "both" else (a.cluster,)):
            cases[case] = summary(runs_of(case, a, work, overrides))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = header("startup", vars(a), "workers: 1 each (Ray cpus_per_worker=1)")
    first = cases[next(iter(cases))]
    report.update({
        "command": f"lorapipe train {Path(a.config).relative_to(ROOT) if Path(a.config).is_relative_to(ROOT) else a.config} "
                   + " ".join(overrides),
        # The headline figures are the first case's (own, unless only `running` was asked for).
        "case": next(iter(cases)),
        "wall_to_first_step_s": first["wall_to_first_step_s"],
        "phases_s": first["phases_s"],
        "target_s": 20.0,
        "cases": cases,
    })
    out = write_json(a.out, report)
    plot(report, out.with_suffix(".png"))
    for case, c in cases.items():
        print(f"start-up, {CASE_LABELS[case]}: median {c['wall_to_first_step_s']['median']:.1f} s")
    print(f"-> {out}")
    return report


if __name__ == "__main__":
    main()
