"""Packing and data preparation on the CPU (writes bench/results/packing.json + .png):

  training   real (non-pad) tokens/s of packed vs padded micro batches, bare PEFT loop (LoRA r=8,
             fp32, one torch thread), on alpaca rows whose prompt and response lengths are drawn
             from lognormal distributions (a long tail, like instruction data). Padded: micro
             batches of --batch examples padded to their longest; packed: --packed-batch blocks of
             --seq tokens filled by best-fit decreasing (per-example position_ids, no cross
             attention). Same examples, interleaved over repeats.
  prep       rows/s of preparing --rows short rows: the in-driver path (datasets, one process) vs
             the Ray Data path (read_json + map_batches tokenize across a local Ray of --ray-cpus
             CPUs, consumed to the end), both to tokenized training rows.

    python bench/packing.py --rows 1000000 --repeats 2 --steps 6
    python bench/packing.py --quick          # smallest sizes (the smoke test)
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, header, save_figure, save_llama, spread, write_json  # noqa: E402

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def lognormal_rows(n: int, seed: int, median_prompt: float, median_response: float, cap: int) -> list[dict]:
    """Alpaca rows with lognormal prompt/response lengths in single-letter tokens (sigma 1.0)."""
    rng = random.Random(seed)

    def words(median: float) -> str:
        return " ".join(rng.choice(LETTERS) for _ in range(max(1, min(cap, int(rng.lognormvariate(0, 1.0) * median)))))

    return [{"instruction": "Repeat the word.", "input": words(median_prompt), "output": words(median_response)}
            for _ in range(n)]


def write_jsonl(rows, path: Path) -> Path:
    with path.open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def prepared(path: Path, tok, seq: int, packing: bool):
    from pipelines.config.schema import DataSection
    from pipelines.data.prepare import prepare_data

    return prepare_data(DataSection(path=str(path), max_seq_len=seq, packing=packing, eval_fraction=0.01), tok, 0)


def train_window(model_dir: Path, batches: list, warmup: int) -> dict:
    """Real tokens/s and slot use over `batches` after `warmup` of them (a fresh LoRA each time)."""
    import torch

    from lora import apply_lora, build_lora_config, load_base_model

    torch.manual_seed(0)
    base = load_base_model(str(model_dir), dtype="fp32")
    model = apply_lora(base, build_lora_config(base, r=8, alpha=16, target_modules="all-linear"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    model.train()
    seconds, real, slots = 0.0, 0, 0
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            seconds += time.perf_counter() - t0
            real, slots = real + batch.real_tokens, slots + batch.slots
    return {"real_tokens_per_s": real / seconds, "non_pad_share": real / slots, "seconds": seconds,
            "real_tokens": real}


def bench_training(a, work: Path) -> dict:
    import torch

    from lora import load_tokenizer
    from pipelines.data.batches import MicroBatches

    torch.set_num_threads(1)
    model_dir = save_llama(work / "model", hidden=a.hidden, layers=a.layers, heads=4, intermediate=a.hidden * 4)
    tok = load_tokenizer(str(model_dir))
    path = write_jsonl(lognormal_rows(a.examples, 0, a.median_prompt, a.median_response, a.seq), work / "long.jsonl")
    padded, packed = prepared(path, tok, a.seq, False), prepared(path, tok, a.seq, True)
    n = a.steps + a.warmup
    batches = {"padded": [MicroBatches(padded.train, a.batch, 0, tok.pad_token_id)[i] for i in range(n)],
               "packed": [MicroBatches(packed.train, a.packed_batch, 0, tok.pad_token_id)[i] for i in range(n)]}
    runs = {name: [] for name in batches}
    for _ in range(a.repeats):
        for name, bs in batches.items():
            runs[name].append(train_window(model_dir, bs, a.warmup))
    lengths = [len(x) for x in padded.train["input_ids"]]
    out = {name: {"real_tokens_per_s": spread([r["real_tokens_per_s"] for r in rs]),
                  "non_pad_share": spread([r["non_pad_share"] for r in rs])} for name, rs in runs.items()}
    out["speedup_real_tokens_per_s"] = out["packed"]["real_tokens_per_s"]["median"] / \
        out["padded"]["real_tokens_per_s"]["median"]
    out["data"] = {"examples": len(lengths), "tokens_p50": sorted(lengths)[len(lengths) // 2],
                   "tokens_p95": sorted(lengths)[int(len(lengths) * 0.95)], "tokens_max": max(lengths),
                   "packing_efficiency_of_blocks": packed.stats["packing_efficiency"],
                   "examples_per_block": packed.stats["examples_per_block"]}
    return out


def short_rows_file(n: int, path: Path) -> Path:
    rng = random.Random(1)
    pool = [" ".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 24))) for _ in range(997)]
    with path.open("w") as f:
        f.writelines(json.dumps({"text": f"{pool[i % 997]} {pool[(i * 7) % 997]}"}) + "\n" for i in range(n))
    return path


def bench_prep(a, work: Path) -> dict:
    import ray

    from lora import load_tokenizer
    from pipelines.config.load import validate_config
    from pipelines.config.schema import DataSection
    from pipelines.data.prepare import prepare_data
    from pipelines.data.streaming import tokenized_stream

    model_dir = work / "model"
    path = short_rows_file(a.rows, work / "short.jsonl")
    tok = load_tokenizer(str(model_dir))
    t0 = time.perf_counter()
    data = prepare_data(DataSection(path=str(path), format="text", max_seq_len=64, eval_fraction=0.01), tok, 0)
    driver_s, driver_rows = time.perf_counter() - t0, len(data.train) + len(data.eval)
    del data
    cfg = validate_config({"model": {"path": str(model_dir)}, "data": {
        "path": str(path), "format": "text", "max_seq_len": 64, "eval_fraction": 0.01, "engine": "ray"}})
    ray.init(num_cpus=a.ray_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        t0 = time.perf_counter()
        ray_rows = sum(b.num_rows for b in tokenized_stream(cfg, "train").iter_batches(
            batch_size=8192, batch_format="pyarrow"))
        ray_s = time.perf_counter() - t0
    finally:
        ray.shutdown()
    return {"rows": a.rows, "file_mib": round(path.stat().st_size / 2**20, 1),
            "driver": {"seconds": driver_s, "rows_per_s": a.rows / driver_s, "rows_out": driver_rows},
            "ray_data": {"seconds": ray_s, "rows_per_s": a.rows / ray_s, "rows_out_train": ray_rows,
                         "cpus": a.ray_cpus}}


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t, p = report["training"], report["prep"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.2))
    a1.bar(["padded", "packed"], [t[k]["real_tokens_per_s"]["median"] for k in ("padded", "packed")], color="#3a7")
    a1.set_ylabel("real tokens/s (median)")
    a1.set_title(f"training: {t['speedup_real_tokens_per_s']:.2f}x from packing", fontsize=9)
    a2.bar(["in driver", f"Ray Data ({p['ray_data']['cpus']} CPUs)"],
           [p["driver"]["rows_per_s"], p["ray_data"]["rows_per_s"]], color="#37a")
    a2.set_ylabel("rows/s prepared")
    a2.set_title(f"prep of {p['rows']:,} short rows", fontsize=9)
    save_figure(fig, path)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=600)
    ap.add_argument("--median-prompt", type=float, default=20)
    ap.add_argument("--median-response", type=float, default=40)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8, help="padded micro batch (examples)")
    ap.add_argument("--packed-batch", type=int, default=2, help="packed micro batch (blocks of --seq)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--ray-cpus", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "packing.json"))
    ap.add_argument("--quick", action="store_true", help="smallest sizes")
    a = ap.parse_args(argv)
    if a.quick:
        a.examples, a.seq, a.hidden, a.layers, a.steps, a.repeats, a.rows = 200, 64, 32, 1, 2, 1, 2000
        a.median_prompt, a.median_response = 3, 6
    return a


def main(argv=None) -> dict:
    a = parse(argv)
    with tempfile.TemporaryDirectory(prefix="lp-packing-") as tmp:
        work = Path(tmp)
        report = header("packing", vars(a), 1)
        report["training"] = bench_training(a, work)
        report["prep"] = bench_prep(a, work)
    out = write_json(a.out, report)
    plot(report, out.with_suffix(".png"))
    print(json.dumps({"training_speedup": report["training"]["speedup_real_tokens_per_s"],
                      "prep_rows_per_s": {k: report["prep"][k]["rows_per_s"] for k in ("driver", "ray_data")}}))
    return report


if __name__ == "__main__":
    main()
