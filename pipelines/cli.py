"""`lorapipe` command line. Bad input: one line on stderr, exit status 2, nothing written."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional


def _quiet_libraries() -> None:
    # DeepSpeed/transformers chatter drowns the one line a user needs; keep warnings only.
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _has_cuda() else "cuda")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")


def _has_cuda() -> bool:
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return False
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def cmd_validate(args) -> int:
    from pipelines.config_loader import dump_config, load_config

    cfg = load_config(args.config, args.overrides)
    print(dump_config(cfg), end="")
    print(f"# global batch size: {cfg.global_batch_size()} "
          f"(micro_batch_size {cfg.train.micro_batch_size} x grad_accum {cfg.train.grad_accum} "
          f"x workers {cfg.scaling.num_workers})")
    return 0


def cmd_train(args) -> int:
    from pipelines.config_loader import load_config
    from pipelines.report import print_train_summary
    from pipelines.train import train

    cfg = load_config(args.config, args.overrides)
    run = train(cfg, progress=not args.no_progress)
    print_train_summary(run)
    return 0


def cmd_demo(args) -> int:
    from pipelines.demo import run_demo

    return run_demo(workdir=args.workdir, quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lorapipe", description="QLoRA/LoRA fine-tuning on Ray Train + DeepSpeed, "
                                "Ray Tune search, MLflow registry with gated promotion.")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(name: str, help: str, fn: Callable) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help)
        sp.add_argument("config", help="YAML config (see configs/)")
        sp.add_argument("overrides", nargs="*", help="dotted KEY=VALUE overrides, e.g. train.lr=1e-4")
        sp.set_defaults(fn=fn)
        return sp

    with_config("validate", "check a config and print the resolved form", cmd_validate)
    t = with_config("train", "one Ray Train run -> run directory (+ MLflow run)", cmd_train)
    t.add_argument("--no-progress", action="store_true", help="no live progress bar")

    d = sub.add_parser("demo", help="the embedded end-to-end run (`make demo`)")
    d.add_argument("--workdir", default=".demo", help="where the demo writes its base model, data and runs")
    d.add_argument("--quick", action="store_true", help="fewer steps (a smoke run, not a convincing result)")
    d.set_defaults(fn=cmd_demo)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    _quiet_libraries()
    from lora import LoraInputError
    from pipelines.errors import UserError

    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (UserError, LoraInputError) as e:
        print(f"lorapipe: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lorapipe: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
