"""Serving throughput on the tiny 4-bit base: does a mixed-adapter batch cost more than a batch of
one adapter? (Goal: mixed-adapter serving keeps at least 80% of single-adapter throughput.)

Four adapters (rank 8, random LoRA weights: throughput does not depend on what they learned) are
written as run directories and registered in a sqlite MLflow registry; then the real
`lorapipe serve` (its own local Ray + Ray Serve, HTTP on 127.0.0.1) serves:

  one_adapter    all four adapters loaded, every request for the first one
  four_adapters  the same server, requests round-robin over the four (mixed batches)
  merged         `lorapipe serve models:/<name>-merged/1` alone (one adapter merged into the
                 dequantized base: no LoRA at all at inference)

`--clients` threads each send requests back to back (HTTP keep-alive) until `--requests` are
answered; requests/s over the wall time, completion tokens/s, per-request latency p50/p99.
Scenarios on the shared server are interleaved over `--repeats`.

    python bench/serving.py --repeats 3 --requests 192 --clients 32 --max-tokens 8
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, free_port, header, save_figure, session_pids, spread, write_json  # noqa: E402

QUESTION = ("Reverse the word.", "a b c d")


def make_adapters(tmp: Path, uri: str, n: int) -> None:
    """n run directories with random rank-8 adapters on the tiny 4-bit base, registered as bench<i>."""
    import torch

    from lora import apply_lora, build_lora_config, load_base_model, model_content_hash
    from pipelines.artifacts.rundir import write_run_dir
    from pipelines.config.load import dump_config, load_config
    from pipelines.data.builtin import materialize_tiny_llama
    from pipelines.registry.register import register_run

    base = materialize_tiny_llama()
    for i in range(n):
        cfg = load_config(ROOT / "configs/tiny-cpu.yaml", [f"model.path={base}", f"run.name=bench{i}",
                                                             f"mlflow.tracking_uri={uri}", f"registry.name=bench{i}"])
        torch.manual_seed(i)
        model = load_base_model(str(base), dtype="fp32", quantization="nf4")
        lora_config = build_lora_config(model, r=8, alpha=16, target_modules="all-linear")
        lora_config.init_lora_weights = False  # random B: each adapter answers differently
        apply_lora(model, lora_config).save_pretrained(str(tmp / f"src{i}"))
        metrics = {"train_loss": 1.0, "eval_loss": 1.0, "eval_perplexity": 2.7, "tokens_per_s": 1.0, "train_steps": 0,
                   "peak_memory_bytes": 1}
        lineage = {"base_model": str(base), "base_model_sha256": model_content_hash(str(base)), "seed": i}
        run = write_run_dir(tmp / f"bench{i}", config_yaml=dump_config(cfg), adapter_src=tmp / f"src{i}",
                            metrics=metrics, lineage=lineage)
        register_run(run.path, tracking_uri=uri)


class Server:
    """`lorapipe serve REFS` in its own process session; stopped with `lorapipe serve --stop`."""

    def __init__(self, refs: list[str], uri: str, env: dict, log: Path):
        self.port, self.env, self.log = free_port(), env, log
        cmd = [sys.executable, "-m", "pipelines.cli", "serve", *refs, "--port", str(self.port), "--tracking-uri", uri]
        with log.open("w") as out:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 300) -> "Server":
        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited: {self.log.read_text()[-2000:]}")
            try:
                if requests.get(f"{self.url}/health", timeout=2).ok:
                    return self
            except requests.RequestException:
                time.sleep(1)
        raise RuntimeError("serve did not start")

    def stop(self) -> None:
        subprocess.run([sys.executable, "-m", "pipelines.cli", "serve", "--stop", "--port", str(self.port)],
                       cwd=ROOT, env=self.env, check=False)
        self.proc.wait(timeout=120)
        for pid in session_pids(self.proc.pid):  # anything of its session still alive: ours, by PID
            os.kill(pid, 9)


def load(url: str, models: list[str], requests_total: int, clients: int, max_tokens: int) -> dict:
    """Send `requests_total` completions (round-robin over models) from `clients` threads."""
    import requests

    def client(k: int) -> list[tuple[float, int]]:
        out, s = [], requests.Session()
        for i in range(k, requests_total, clients):
            body = {"model": models[i % len(models)], "prompt": QUESTION[0], "input": QUESTION[1],
                    "max_tokens": max_tokens}
            t = time.perf_counter()
            r = s.post(f"{url}/v1/completions", json=body, timeout=300)
            r.raise_for_status()
            out.append((time.perf_counter() - t, r.json()["usage"]["completion_tokens"]))
        return out

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [x for part in pool.map(client, range(clients)) for x in part]
    wall = time.perf_counter() - t0
    lat = sorted(x for x, _ in results)
    return {"requests_per_s": len(results) / wall, "completion_tokens_per_s": sum(n for _, n in results) / wall,
            "p50_s": statistics.median(lat), "p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))], "wall_s": wall}


def summarize(runs: list[dict]) -> dict:
    return {k: spread([r[k] for r in runs]) for k in runs[0]}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["scenarios"])
    med = {n: report["scenarios"][n] for n in names}
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.bar(names, [med[n]["requests_per_s"]["median"] for n in names], color=["#4c72b0", "#dd8452", "#55a868"])
    a.set_ylabel("requests/s (median of repeats)")
    a.set_title(f"throughput, {report['settings']['clients']} clients")
    x = range(len(names))
    b.bar([i - 0.2 for i in x], [med[n]["p50_s"]["median"] for n in names], width=0.4, label="p50")
    b.bar([i + 0.2 for i in x], [med[n]["p99_s"]["median"] for n in names], width=0.4, label="p99")
    b.set_xticks(list(x), names)
    b.set_ylabel("latency per request (s)")
    b.legend()
    save_figure(fig, path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--requests", type=int, default=192)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--out", default=str(RESULTS / "serving.json"))
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lorapipe-bench-serving-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LORAPIPE_CACHE": str(tmp / "cache"),
           "LORAPIPE_HOME": str(tmp / "home")}
    os.environ.update({k: env[k] for k in ("LORAPIPE_CACHE", "LORAPIPE_HOME")})
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    make_adapters(tmp, uri, 4)
    adapters = [f"bench{i}-adapter" for i in range(4)]
    runs: dict[str, list[dict]] = {"one_adapter": [], "four_adapters": [], "merged": []}
    server = Server([f"models:/{a}/1" for a in adapters], uri, env, tmp / "serve-adapters.log").wait_ready()
    try:
        load(server.url, adapters, 32, args.clients, args.max_tokens)  # warm-up
        for _ in range(args.repeats):
            runs["one_adapter"].append(load(server.url, adapters[:1], args.requests, args.clients, args.max_tokens))
            runs["four_adapters"].append(load(server.url, adapters, args.requests, args.clients, args.max_tokens))
    finally:
        server.stop()
    server = Server(["models:/bench0-merged/1"], uri, env, tmp / "serve-merged.log").wait_ready()
    try:
        load(server.url, ["bench0-merged"], 32, args.clients, args.max_tokens)
        for _ in range(args.repeats):
            runs["merged"].append(load(server.url, ["bench0-merged"], args.requests, args.clients, args.max_tokens))
    finally:
        server.stop()
    scenarios = {k: summarize(v) for k, v in runs.items()}
    ratio = [m["requests_per_s"] / o["requests_per_s"] for m, o in zip(runs["four_adapters"], runs["one_adapter"])]
    report = {**header("bench/serving.py", vars(args), 1), "scenarios": scenarios,
              "four_over_one_requests_per_s": spread(ratio), "goal_four_over_one_at_least": 0.8}
    out = write_json(args.out, report)
    plot(report, out.with_suffix(".png"))
    print(f"wrote {out}: four/one adapters requests/s ratio {spread(ratio)['median']:.3f} (goal >= 0.8)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
