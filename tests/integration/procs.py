"""Process helpers for tests that start Ray (or a whole cluster) in a process session of their own."""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

# One implementation for the benchmarks and the tests: a Ray head in a session of its own, the
# processes of a session, a free local port.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from common import RayHead, free_port, session_pids  # noqa: E402,F401


def wait_registered(run_path, name: str, timeout: float = 400) -> None:
    """Until Ray Train's checkpoint manager has recorded checkpoint `name` under `run_path` (what a
    restart resumes from; the directory itself can be complete on disk earlier)."""
    import time

    snapshot = Path(run_path) / "checkpoint_manager_snapshot.json"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if snapshot.is_file() and name in snapshot.read_text():
            return
        time.sleep(0.5)
    raise AssertionError(f"{name} not registered in {snapshot} after {timeout}s")


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 (sqlite backend, local artifacts) that a test can stop
    and start again on the same port and store, as an outage would look to a client."""

    def __init__(self, root, port: int | None = None):
        from pathlib import Path

        self.root, self.port = Path(root), port or free_port()
        self.root.mkdir(parents=True, exist_ok=True)
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def command(self) -> list[str]:
        import sys
        from pathlib import Path

        return [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri",
                f"sqlite:///{self.root / 'db.sqlite'}", "--artifacts-destination", str(self.root / "artifacts"),
                "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]

    def env(self) -> dict | None:
        return None  # this process's environment

    def start(self, timeout: float = 90) -> "MlflowServer":
        """Start it and wait until /health answers (or the process exits), else stop it and raise."""
        import subprocess
        import time
        import urllib.request

        self.proc = subprocess.Popen(self.command(), env=self.env(), stdout=open(self.root / "server.log", "a"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline and self.proc.poll() is None:
            try:
                if urllib.request.urlopen(f"{self.uri}/health", timeout=2).status == 200:
                    return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server did not start: {(self.root / 'server.log').read_text()[-2000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        import subprocess

        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass
        self.proc = None
