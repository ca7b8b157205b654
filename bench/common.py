"""Shared by the CPU benchmarks: machine and version info, min/median/max, JSON writing, a test
Llama saved to disk, and a thread that samples this process's anonymous and total RSS."""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
if str(ROOT) not in sys.path:  # scripts run as `python bench/x.py`
    sys.path.insert(0, str(ROOT))

PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "deepspeed", "ray", "accelerate")
# ~20M parameters: 8 x (4*384^2 + 3*384*1536) = 18.9M in the layers, plus a small char vocabulary.
SHAPE_20M = dict(hidden=384, layers=8, heads=6, intermediate=1536)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    mem = meminfo()
    return {"cpu_model": cpu_model(), "cpu_cores": os.cpu_count(),
            "affinity_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "load_avg_1m": os.getloadavg()[0], "mem_total_gib": round(mem.get("MemTotal", 0) / 2**30, 1),
            "mem_available_gib": round(mem.get("MemAvailable", 0) / 2**30, 1),
            "platform": platform.platform(), "python": platform.python_version()}


def versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def meminfo() -> dict:
    """/proc/meminfo in bytes."""
    out = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, rest = line.split(":", 1)
            out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


def spread(values) -> dict:
    """min/median/max (and the raw values) of repeated measurements."""
    values = [float(v) for v in values]
    if not values:
        return {"min": None, "median": None, "max": None, "n": 0, "values": []}
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values),
            "values": values}


def header(script: str, args: dict, torch_threads) -> dict:
    return {"benchmark": script, "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": " ".join([Path(sys.executable).name, *sys.argv]), "settings": args,
            "torch_threads": torch_threads, "machine": machine_info(), "versions": versions()}


def save_figure(fig, path) -> Path:
    """Write a matplotlib figure as PNG and release it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def write_json(path, report: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path


def single_thread_env() -> dict:
    """Environment for a child process that must use one CPU thread."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}


class RayHead:
    """A `ray start --head` on 127.0.0.1 with token auth, in a process session and temp dir of its
    own (so stopping it kills exactly its processes, never a global `ray stop`). Also the head of
    the Jobs API tests (tests/integration/test_submit.py). `env()` is what a
    client process needs to find it the way `lorapipe train` does: RAY_TMPDIR (where `ray start`
    records the machine's cluster) and the token."""

    def __init__(self, num_cpus: int):
        import secrets
        import tempfile

        self.num_cpus = num_cpus
        self.tmp = Path(tempfile.mkdtemp(prefix="lpray-"))  # short: socket paths must stay < 108 chars
        self.token = secrets.token_hex(32)
        self.dashboard_port = free_port()
        self.session = None

    @property
    def address(self) -> str:
        """The dashboard (Jobs API) address: what `lorapipe submit --address` takes."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH", "VIRTUAL_ENV")}
        # The token comes from the environment, so ~/.ray/auth_token is neither read nor written.
        # PATH without this venv's bin: the head is started as `.venv/bin/ray start` by a user who
        # did not activate the venv, so a submitted job must find its Python without PATH's help.
        venv_bin = str(Path(sys.executable).parent)
        path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != venv_bin)
        return {**env, "RAY_TMPDIR": str(self.tmp), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                "PATH": path}

    def __enter__(self) -> "RayHead":
        import subprocess

        ray_bin = Path(sys.executable).with_name("ray")
        cmd = [str(ray_bin), "start", "--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
               "--include-dashboard=true", f"--num-cpus={self.num_cpus}", f"--temp-dir={self.tmp / 'ray'}",
               "--disable-usage-stats", f"--port={free_port()}", f"--dashboard-port={self.dashboard_port}",
               f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}"]
        proc = subprocess.Popen(cmd, env=self.env(), start_new_session=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        self.session = proc.pid
        try:
            out, _ = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            self.__exit__()  # a hung `ray start` must not leave its half-started head behind
            raise
        if proc.returncode != 0:
            self.__exit__()
            raise RuntimeError(f"ray start failed:\n{out[-3000:]}")
        return self

    def __exit__(self, *exc) -> None:
        import shutil
        import signal

        for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            for pid in session_pids(self.session):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + wait
            while session_pids(self.session) and time.time() < deadline:
                time.sleep(0.5)
        shutil.rmtree(self.tmp, ignore_errors=True)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_pids(session) -> list[int]:
    """PIDs of every live process in process session `session`."""
    pids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            if session is not None and os.getsid(int(entry)) == session:
                pids.append(int(entry))
        except (ProcessLookupError, PermissionError):
            pass
    return pids


def save_llama(out: Path, *, hidden: int, layers: int, heads: int, intermediate: int, seed: int = 0) -> Path:
    """A random-init fp32 Llama with the builtin model's tokenizer, saved as safetensors + tokenizer."""
    from lora import tiny
    from pipelines.data.builtin import tokenizer_corpus

    # The builtin tokenizer's trainer (word-level now, char-level before): the demo data's own.
    train_tokenizer = getattr(tiny, "train_word_tokenizer", None) or getattr(tiny, "train_char_tokenizer")
    tok = train_tokenizer(tokenizer_corpus())
    model = tiny.build_tiny_llama(len(tok), hidden=hidden, layers=layers, heads=heads, intermediate=intermediate,
                             max_positions=1024, seed=seed, pad_token_id=tok.pad_token_id,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return out


def param_count(path: Path) -> int:
    from safetensors import safe_open

    n = 0
    for f in Path(path).glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                n += _prod(st.get_slice(k).get_shape())
    return n


def _prod(shape) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def proc_status_bytes(*keys: str) -> dict:
    """Fields of /proc/self/status (kB lines) in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in keys:
            out[key] = int(rest.split()[0]) * 1024
    return out


class RssSampler:
    """Samples RssAnon and VmRSS every `interval` s in a thread and keeps the high-water marks.
    The kernel keeps a total-RSS high-water mark (VmHWM) but none for anonymous memory alone."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.peak_anon = 0
        self.peak_rss = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> dict:
        s = proc_status_bytes("RssAnon", "VmRSS", "RssFile", "VmHWM")
        self.peak_anon = max(self.peak_anon, s.get("RssAnon", 0))
        self.peak_rss = max(self.peak_rss, s.get("VmRSS", 0))
        self.samples += 1
        return s

    def _run(self):
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()

    def mark(self) -> dict:
        """Current and high-water figures so far (for a phase breakdown)."""
        s = self.sample()
        return {"rss_anon": s.get("RssAnon", 0), "rss": s.get("VmRSS", 0), "rss_file": s.get("RssFile", 0),
                "peak_anon_so_far": self.peak_anon, "peak_rss_so_far": self.peak_rss, "vm_hwm": s.get("VmHWM", 0)}


def gib(n) -> float:
    return round(float(n) / 2**30, 3)
