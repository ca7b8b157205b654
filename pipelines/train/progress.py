"""Live progress on the driver: Ray Train calls our UserCallback on its controller after every
report; the callback forwards rank 0's metrics to a small actor the driver polls."""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager

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
def live_progress(sink, total_steps: int, label: str, enabled: bool = True, line_every_s: float = 10.0):
    """While the body runs: on a terminal, a rich progress bar (step/total, loss, tokens/s, ETA);
    without one (CI, a log file), a whole line whenever the step moved, at most every
    `line_every_s` seconds, and a last one at the end."""
    if not enabled:
        yield
        return
    from rich.console import Console

    console = Console()
    if console.is_terminal:
        with _progress_bar(console, total_steps, label) as show:
            with _polling(sink, show):
                yield
        return
    last = {"step": None, "at": 0.0}

    def show(m: dict, final: bool = False) -> None:
        now = time.monotonic()
        if m.get("step") != last["step"] and (final or now - last["at"] >= line_every_s):
            print(f"{label}: step {m.get('step', 0)}/{total_steps}  {_describe(m)}", flush=True)
            last.update(step=m.get("step"), at=now)

    with _polling(sink, show):
        yield


@contextmanager
def _progress_bar(console, total_steps: int, label: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console) as bar:
        task = bar.add_task(label, total=total_steps, info="starting workers...")
        yield lambda m, final=False: bar.update(task, completed=m.get("step", 0), info=_describe(m))


@contextmanager
def _polling(sink, show):
    """Poll the sink about once a second and hand its latest metrics to `show`; once more at the end."""
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            m = _latest(sink, timeout=5)
            if m:
                show(m)
            stop.wait(1.0)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(timeout=5)
        final = _latest(sink, timeout=5)
        if final:
            show(final, final=True)


def _latest(sink, timeout: float) -> dict:
    try:
        return ray.get(sink.latest.remote(), timeout=timeout)
    except Exception:  # the sink is gone with a failed run: nothing more to show
        return {}
