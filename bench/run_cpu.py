"""`make bench`: the CPU benchmark set, one script after another, JSON + PNG into bench/results/.

    python bench/run_cpu.py                          # everything at the sizes in bench/README.md
    python bench/run_cpu.py --only startup,levers    # a subset
    python bench/run_cpu.py --skip qlora_memory      # the 1B memory runs take minutes per mode
    python bench/run_cpu.py --only tune_efficiency   # grid vs ASHA+TPE, real Tune searches
    python bench/run_cpu.py --quick                  # smallest sizes (what the smoke test runs)

Each script runs in its own process (one torch thread for in-process timings), so a failure in
one is reported and the rest still run; the exit status is 1 if any failed.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, single_thread_env  # noqa: E402

# name -> (full arguments, --quick arguments)
BENCHES = {
    "pipeline_efficiency": (["--repeats", "5", "--steps", "48", "--warmup", "4", "--seq", "128", "--batch", "2"],
                            ["--shape", "tiny", "--repeats", "1", "--steps", "3", "--warmup", "1", "--seq", "32",
                             "--batch", "2"]),
    "startup": (["--repeats", "3"], ["--repeats", "1", "--max-steps", "2", "--cluster", "own"]),
    "levers": (["--repeats", "2", "--steps", "5", "--warmup", "1", "--seq", "128", "--batch", "4"],
               ["--shape", "tiny", "--repeats", "1", "--steps", "2", "--warmup", "1", "--seq", "32", "--batch", "2"]),
    # The two modes the target is about; add lora_bf16,full_bf16 with --memory-modes (minutes each).
    # fp32: a bf16 backward of the 1B model does not finish within 40 min on this CPU (no fast bf16 GEMMs).
    "qlora_memory": (["--size", "1b", "--seq", "256", "--steps", "4", "--dtype", "fp32"],
                     ["--size", "tiny", "--seq", "32", "--steps", "1"]),
    # Real Tune searches through Ray: the longest of the set (~30-40 min here).
    "tune_efficiency": (["--repeats", "3"],
                        ["--max-steps", "8", "--grace", "4", "--samples", "3", "--repeats", "1",
                         "--grid-lr-points", "2"]),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help=f"comma list of: {', '.join(BENCHES)}")
    ap.add_argument("--skip", default="", help="comma list to leave out")
    ap.add_argument("--quick", action="store_true", help="smallest sizes, one repeat")
    ap.add_argument("--memory-modes", default="qlora_nf4,qlora_nf4_peft",
                    help="qlora_memory modes (qlora_nf4, qlora_nf4_peft, lora_bf16, full_bf16)")
    ap.add_argument("--out-dir", default=str(RESULTS))
    a = ap.parse_args(argv)
    only = [n for n in a.only.split(",") if n] or list(BENCHES)
    skip = {n for n in a.skip.split(",") if n}
    unknown = [n for n in [*only, *skip] if n not in BENCHES]
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; allowed: {', '.join(BENCHES)}")
    failed = []
    for name in (n for n in only if n not in skip):
        full, quick = BENCHES[name]
        args = list(quick if a.quick else full)
        if name == "qlora_memory":
            args += ["--modes", a.memory_modes]
        cmd = [sys.executable, str(ROOT / "bench" / f"{name}.py"), *args,
               "--out", str(Path(a.out_dir) / f"{name}.json")]
        print(f"== {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, cwd=ROOT, env=single_thread_env()).returncode
        print(f"== {name}: exit {rc} after {time.perf_counter() - t0:.0f} s", flush=True)
        if rc != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
