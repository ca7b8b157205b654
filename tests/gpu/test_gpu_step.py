"""bench/gpu_step.py on CUDA: GPU peak memory, a detected peak FLOP/s, and QLoRA when bitsandbytes is there."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_lora_and_qlora_on_cuda(tmp_path):
    out = tmp_path / "gpu_step.json"
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_step.py"), "--sizes", "tiny", "--modes", "lora,qlora",
           "--steps", "3", "--warmup", "1", "--seq", "256", "--batch", "2", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    report = json.loads(out.read_text())
    assert proc.returncode == 0, proc.stderr[-3000:]
    lora_run, qlora_run = report["configs"]
    for c in (lora_run, qlora_run):
        if c["status"] == "skipped":
            assert c["mode"] == "qlora" and importlib.util.find_spec("bitsandbytes") is None, c
            continue
        assert c["status"] == "ok", c
        assert c["device"]["type"] == "cuda" and c["tokens_per_s"]["median"] > 0
        mem = c["memory"]
        assert 0 < mem["peak_allocated_bytes"] <= mem["peak_reserved_bytes"]
        assert mem["ratio_allocated_to_16n"] > 0
        if c["peak_bf16_tflops"] is not None:
            assert 0 < c["mfu"] < 1
