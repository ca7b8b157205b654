"""Live progress on the driver: Ray Train calls our UserCallback on its controller after every
report; the callback forwards rank 0's metrics to a small actor the driver polls."""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Optional

import ray
from ray.train import UserCallback


@ray.remote(num_cpus=0)
class ProgressSink:
    def __init__(self):
        self.metrics: dict = {}

    def update(self, metrics: dict) -> None:
        self.metrics = {**self.metrics, **metrics}

    def latest(self) -> dict:
        return self.metrics


class ForwardMetrics(UserCallback):
    def __init__(self, sink):
        self.sink = sink

    def after_report(self, run_context, metrics, checkpoint):
        if metrics:
            self.sink.update.remote(metrics[0])


def _describe(m: dict) -> str:
    parts = [f"loss {m['train_loss']:.4f}" if "train_loss" in m else "",
             f"eval {m['eval_loss']:.4f}" if "eval_loss" in m else "",
             f"{m['tokens_per_s']:,.0f} tok/s" if "tokens_per_s" in m else ""]
    return "  ".join(p for p in parts if p)


@contextmanager
def live_progress(sink, total_steps: int, label: str, enabled: bool = True):
    """A rich progress bar (step/total, loss, tokens/s, ETA) while the body runs."""
    if not enabled:
        yield
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    stop = threading.Event()
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[info]}"), TimeRemainingColumn()) as bar:
        task = bar.add_task(label, total=total_steps, info="starting workers...")

        def poll():
            while not stop.is_set():
                try:
                    m = ray.get(sink.latest.remote(), timeout=5)
                except Exception:
                    m = {}
                if m:
                    bar.update(task, completed=m.get("step", 0), info=_describe(m))
                stop.wait(1.0)

        t = threading.Thread(target=poll, daemon=True)
        t.start()
        try:
            yield
        finally:
            stop.set()
            t.join(timeout=5)
            final: Optional[dict] = None
            try:
                final = ray.get(sink.latest.remote(), timeout=5)
            except Exception:
                pass
            if final:
                bar.update(task, completed=final.get("step", 0), info=_describe(final))
