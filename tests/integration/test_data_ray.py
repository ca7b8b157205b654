"""The Ray Data path on a real local Ray: a generated 100k-row corpus, tokenized and packed in
map_batches and streamed to 2 workers through Ray Train's dataset sharding, trains with the
driver's memory bounded far below the corpus, and a SIGKILLed worker's run resumes from its
checkpoint without repeating or skipping an example (every trained block is recorded per worker
through LORAPIPE_RECORD_EXAMPLES; blocks hold distinct rows, so a repeated block is a repeated row)."""
from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
from procs import wait_registered

pytestmark = pytest.mark.integration
ROWS = 100_000
STEPS, CKPT, MICRO = 16, 4, 8


@pytest.fixture(scope="module")
def recorded_ray(tmp_path_factory):
    """A local Ray whose workers record the rows they train on (the env var must exist before
    ray.init: workers inherit the raylet's environment)."""
    import ray

    record = tmp_path_factory.mktemp("records")
    os.environ["LORAPIPE_RECORD_EXAMPLES"] = str(record)
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False,
             configure_logging=False)
    yield record
    ray.shutdown()
    del os.environ["LORAPIPE_RECORD_EXAMPLES"]


def write_corpus(path: Path) -> int:
    """ROWS rows of ~3 KB (a 300 MB corpus, so that what the driver must hold anyway is small
    beside it): a short `text` of 8-28 tokens that starts with the row's id (digits are single
    tokens), so rows differ and several fit a 32-token block, and a `meta` column the text format
    does not read. Generating takes a second or two."""
    rng = random.Random(0)
    bodies = [" ".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 20))) for _ in range(64)]
    meta = "x" * 3000
    with path.open("w") as f:
        f.writelines(json.dumps({"text": f"{' '.join(str(i))} : {bodies[i % 64]}", "meta": meta}) + "\n"
                     for i in range(ROWS))
    return path.stat().st_size


def read_records(record: Path) -> dict[int, list[tuple[int, int, int, str]]]:
    out = {}
    for f in sorted(record.glob("rank*.txt")):
        rows = [line.split() for line in f.read_text().splitlines()]
        out[int(f.stem[4:])] = [(int(a), int(b), int(c), d) for a, b, c, d in rows]
    return out


class PeakRss(threading.Thread):
    """The driver process's peak RSS, sampled every 20 ms."""

    def __init__(self):
        super().__init__(daemon=True)
        self.proc, self.peak, self.running = psutil.Process(), 0, True

    def run(self):
        while self.running:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.02)


def _train_workers() -> list[psutil.Process]:
    import ray
    from ray._private import ray_constants

    raylet = ray._private.worker._global_node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
    return [p for p in psutil.Process(raylet).children(recursive=True)
            if "RayTrainWorker" in " ".join(p.cmdline() or [])]


def test_streamed_corpus_trains_with_bounded_driver_memory_and_resumes_exactly(recorded_ray, tiny_config, tmp_path):
    from pipelines.train.driver import train

    corpus = tmp_path / "corpus.jsonl"
    corpus_bytes = write_corpus(corpus)
    cfg = tiny_config(f"data.path={corpus}", "data.format=text", "data.task=null", "data.max_examples=null",
                      "data.engine=ray", "data.max_seq_len=32", "data.packing=true", "data.eval_fraction=0.01",
                      "model.quantization=none", "model.dtype=fp32", "scaling.cpus_per_worker=0.5",
                      f"train.micro_batch_size={MICRO}", f"train.max_steps={STEPS}", f"train.checkpoint_every={CKPT}",
                      "train.report_every=2", f"train.eval_every={STEPS}", "train.eval_batches=1",
                      "run.max_failures=2", "run.name=streamed")
    # The driver's own imports and model checks are not data: pay them before the baseline.
    import mlflow  # noqa: F401
    import ray.data  # noqa: F401
    import ray.train.torch  # noqa: F401

    from pipelines.artifacts.rundir import write_run_dir  # noqa: F401
    from pipelines.data.builtin import resolve_builtins
    from pipelines.train.driver import preflight

    t0 = time.time()
    preflight(resolve_builtins(cfg))
    mlflow.MlflowClient(f"sqlite:///{tmp_path / 'warm.db'}").search_experiments()  # the store's ~40 MB
    rss = PeakRss()
    before = rss.proc.memory_info().rss
    rss.start()
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(run=train(cfg, progress=False)))
    thread.start()
    wait_registered(Path(cfg.storage_path()) / "streamed", f"checkpoint_step_{CKPT:07d}")
    deadline = time.time() + 60  # let training run past the checkpoint, so the kill loses some steps
    while time.time() < deadline and max((r[2] for r in read_records(recorded_ray).get(0, [])), default=0) < CKPT + 3:
        time.sleep(0.1)
    print(f"\nkill at {time.time() - t0:.0f}s")
    workers = _train_workers()
    assert workers, "no Ray Train worker process found"
    os.kill(workers[0].pid, signal.SIGKILL)
    thread.join(timeout=600)
    print(f"done at {time.time() - t0:.0f}s")
    rss.running = False
    run = result["run"]
    metrics = run.metrics()
    assert metrics["restarts"] >= 1 and metrics["train_steps"] == STEPS
    assert metrics["non_pad_share"] > 0.85  # packed blocks: several examples each, little padding
    resumed = metrics["resumed_from_step"][0]

    records = read_records(recorded_ray)
    assert sorted(records) == [0, 1]
    trained, lost_and_redone = [], 0
    for rank, rows in records.items():
        first = [r for r in rows if r[0] == 0 and r[2] <= resumed]   # kept by the checkpoint
        lost = [r[3] for r in rows if r[0] == 0 and r[2] > resumed]   # trained, then rolled back
        again = [r[3] for r in rows if r[0] == 1]
        assert len(first) == resumed * MICRO and len(again) == (STEPS - resumed) * MICRO
        # The restarted worker goes on exactly where the checkpoint stood: its first rows are the
        # ones the killed attempt trained after the checkpoint (none skipped), then new ones.
        assert again[:len(lost)] == lost
        lost_and_redone += len(lost)
        trained += [r[3] for r in first] + again
    assert lost_and_redone > 0  # the kill really landed after the checkpoint
    assert len(trained) == len(set(trained)) == STEPS * MICRO * 2  # no example trained twice

    # The driver never held the corpus: its peak RSS grew by far less than the corpus file (what
    # it does hold: Ray Train's and MLflow's bookkeeping, the 2000-row sample, the eval rows).
    growth = rss.peak - before
    assert growth < corpus_bytes / 5, (growth, corpus_bytes)
    lineage = run.lineage()
    assert lineage["data_stats"]["engine"] == "ray" and lineage["data_stats"]["sample"]["rows"] == ROWS
    assert lineage["datasets"][0]["fingerprint"].startswith("sha256:")
    print(f"driver RSS growth {growth / 2**20:.1f} MiB; corpus {corpus_bytes / 2**20:.1f} MiB; "
          f"resumed from step {resumed}; {lost_and_redone} rows redone after the kill")
