"""`lorapipe` command line. Bad input: one line on stderr, exit status 2, nothing written."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional

from pipelines.core.cliargs import IntermixedParser, add_config_parser
from pipelines.core.defaults import default_tracking_uri


def _quiet_libraries() -> None:
    # DeepSpeed/transformers chatter drowns the one line a user needs; keep warnings only.
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _has_cuda() else "cuda")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # Bound MLflow's own HTTP retries (its default backs off for minutes); ours are bounded too.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # no sqlite migration chatter on stderr
    # Downloading a registered version's few files needs no progress bar of its own.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


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
    from pipelines.config.load import dump_config, load_config

    cfg = load_config(args.config, args.overrides)
    print(dump_config(cfg), end="")
    accum = "to match (the plan picks the micro batch when the run starts)" if cfg.train.grad_accum is None else \
        cfg.train.grad_accum
    print(f"# global batch size: {cfg.global_batch_size()} "
          f"(micro_batch_size {cfg.train.micro_batch_size} x grad_accum {accum} x workers {cfg.scaling.num_workers})")
    return 0


def cmd_data(args) -> int:
    """Per-source rows, token lengths, truncation, unlabelled rows and packing efficiency."""
    import json

    from lora import load_tokenizer
    from pipelines.config.load import load_config
    from pipelines.core.errors import UserError
    from pipelines.data.builtin import resolve_builtins
    from pipelines.data.report import data_report, format_report
    from pipelines.plan.auto import with_auto_micro_batch

    cfg = with_auto_micro_batch(resolve_builtins(load_config(args.config, args.overrides)))
    if args.sample <= 0:
        raise UserError(f"--sample {args.sample}: give a positive number of rows")
    tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code, cfg.model.revision)
    report = data_report(cfg, tokenizer, args.sample)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def cmd_train(args) -> int:
    from pipelines.config.load import load_config
    from pipelines.plan.verdict import fit_verdict
    from pipelines.train.driver import train
    from pipelines.train.report import print_train_summary

    cfg = load_config(args.config, args.overrides)
    if args.resume:
        cfg = config_for_resume(cfg, args)
    print(fit_verdict(cfg, force=args.force))  # refuses a plan that does not fit unless --force
    run = train(cfg, progress=not args.no_progress)
    print_train_summary(run)
    return 0


def config_for_resume(cfg, args):
    """An interrupted run continues exactly as it was configured (its saved config): overrides
    would silently not apply, so they are refused, and CONFIG must name the same config."""
    from pipelines.core.errors import UserError
    from pipelines.train.driver import config_to_resume

    if args.overrides:
        raise UserError(f"--resume continues {args.resume} with its saved config; overrides "
                        f"({' '.join(args.overrides)}) cannot be applied to a run in progress")
    saved = config_to_resume(args.resume)
    if saved.name != cfg.name:
        raise UserError(f"--resume {args.resume} is a run of config {saved.name!r}, not {cfg.name!r} ({args.config})")
    print(f"resuming run {saved.run.name} with its saved config (the values in {args.config} are not re-read)")
    return saved


def cmd_tune(args) -> int:
    from pipelines.config.load import load_config
    from pipelines.plan.verdict import fit_verdict
    from pipelines.tune.report import print_tune_summary
    from pipelines.tune.search import tune

    cfg = load_config(args.config, args.overrides)
    if not cfg.tune:
        from pipelines.core.errors import UserError

        raise UserError(f"{args.config} has no tune: section (see configs/tiny-cpu-tune.yaml)")
    print(fit_verdict(cfg, force=args.force))
    result = tune(cfg, progress=not args.no_progress, resume=args.resume)
    print_tune_summary(result)
    return 0


def cmd_ablate(args) -> int:
    from pipelines.ablate.grid import check_kind, trial_configs
    from pipelines.ablate.run import ablate
    from pipelines.config.load import load_config
    from pipelines.plan.verdict import fit_verdict

    kind = check_kind(args.kind)
    # --values takes every word after it; the dotted KEY=VALUE ones are overrides.
    values = [v for v in args.values or [] if "=" not in v] or None
    cfg = load_config(args.config, args.overrides + [v for v in args.values or [] if "=" in v])
    print(fit_verdict(cfg, force=args.force, configs=list(trial_configs(cfg, kind, values).values())))
    result = ablate(cfg, kind, values, args.out, progress=not args.no_progress)
    print(result.table_md.read_text())
    print(f"table: {result.table_md}\ncsv:   {result.table_csv}\nplot:  {result.plot}")
    for row in result.failed:
        print(f"error: {kind}={row['value']}: {row.get('error')}")
    return 1 if result.failed else 0


def cmd_pipeline(args) -> int:
    from pipelines.config.load import load_config
    from pipelines.pipeline import run_pipeline
    from pipelines.plan.verdict import fit_verdict

    cfg = load_config(args.config, args.overrides)
    print(fit_verdict(cfg, force=args.force))
    outcome = run_pipeline(cfg, progress=not args.no_progress)
    for line in outcome.lines:
        print(line)
    print(f"run directory: {outcome.run_path}")
    return 0


def cmd_merge(args) -> int:
    from pipelines.registry.merge import merge_run

    report = merge_run(args.run_dir, args.out_dir, onto=args.onto)
    diff = report.get("max_abs_logit_diff")
    print(f"merged {args.run_dir} -> {args.out_dir} ({report['method']}, onto {args.onto}); "
          f"max |logit diff| vs unmerged: {diff:.3g}" if diff is not None else "")
    return 0


def cmd_register(args) -> int:
    from pipelines.eval.suite import load_suite
    from pipelines.registry.register import register_run

    reg = register_run(args.run_dir, name=args.name, tracking_uri=args.tracking_uri,
                       suite=load_suite(args.suite) if args.suite else None, merged_dir=args.merged)
    verb = "registered" if reg.created else "already registered (nothing new)"
    print(f"{verb}: {', '.join(f'{name} v{v}' for name, v in reg.versions().items())} (MLflow run {reg.run_id})")
    return 0


def cmd_sync(args) -> int:
    from pipelines.artifacts.rundir import RunDir
    from pipelines.core.errors import UserError
    from pipelines.core.secrets import redact_uri
    from pipelines.tracking import runs as tracking
    from pipelines.tracking.runs import reachable

    run = RunDir.open(args.run_dir)
    run_id = run.lineage().get("mlflow_run_id")
    if not run_id:
        raise UserError(f"{run.path} has no MLflow run (trained with mlflow.enabled=false); use `lorapipe register`")
    uri = args.tracking_uri or run.config().tracking_uri()
    reachable(uri)
    history = run.history()
    missing = tracking.finalize_run(uri, run_id, history, run.metrics())
    if missing:
        raise UserError(f"MLflow at {redact_uri(uri)} still lacks steps {missing}; try again")
    print(f"MLflow run {run_id} holds all {len(history)} reports of {run.path} and is FINISHED")
    return 0


def cmd_promote(args) -> int:
    from pipelines.eval.commands import print_results
    from pipelines.registry.promote import promote

    result = promote(args.name, args.version, args.alias, force=args.force, reason=args.reason,
                     tracking_uri=default_tracking_uri(args.tracking_uri))
    if result.rows:
        print_results(result.rows, f"{args.name}: candidate vs {args.alias} on the gate suite")
    print(result.message, file=sys.stdout if result.promoted else sys.stderr)
    return 0 if result.promoted else 1


def cmd_registry(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from pipelines.registry.show import describe_model, list_models

    if args.action in ("show", "set-gate") and not args.name:
        from pipelines.core.errors import UserError

        raise UserError(f"registry {args.action} needs a NAME")
    if args.action == "set-gate":
        from pipelines.registry.commands import cmd_set_gate

        return cmd_set_gate(args)
    uri = default_tracking_uri(args.tracking_uri)
    rows = list_models(uri) if args.action == "list" else describe_model(args.name, uri)
    table = Table(title=args.name or "registered models")
    for col in (rows[0].keys() if rows else ["name"]):
        table.add_column(col)
    for r in rows:
        table.add_row(*[str(v) for v in r.values()])
    Console().print(table)
    return 0


def cmd_demo(args) -> int:
    from pipelines.demo import run_demo

    return run_demo(workdir=args.workdir, quick=args.quick)


def cmd_serve(args) -> int:
    from pathlib import Path

    from pipelines.core.errors import UserError
    from pipelines.serve.app import ServeSettings
    from pipelines.serve.launch import run_server, run_vllm, stop_server

    if args.stop:
        return stop_server(args.port)
    settings = ServeSettings(host=args.host, port=args.port, follow_interval_s=args.follow_interval,
                             max_batch_size=args.max_batch_size, max_ongoing_requests=args.max_ongoing,
                             max_queued_requests=args.max_queued, request_timeout_s=args.request_timeout)
    uri = default_tracking_uri(args.tracking_uri)
    if args.engine == "vllm":
        if not args.lora_path:
            raise UserError("--engine vllm needs --lora-path s3://... (the folder Ray Serve LLM loads adapters from)")
        return run_vllm(args.refs, settings, uri, args.lora_path, Path(args.out), args.run)
    if args.run:
        raise UserError("--run deploys the --engine vllm config; the peft engine always runs")
    return run_server(args.refs, settings, uri)


def add_serve_parser(sub) -> None:
    sv = sub.add_parser("serve", help="OpenAI-compatible Ray Serve app: one base, many registered adapters")
    sv.add_argument("refs", nargs="*", metavar="REF", help="run directory, models:/NAME/VERSION or models:/NAME@ALIAS")
    sv.add_argument("--host", default="127.0.0.1", help="address Serve's HTTP proxy binds (default 127.0.0.1)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--follow-interval", type=float, default=30.0, metavar="S",
                    help="seconds between checks of each @ALIAS REF (a moved alias is served without restart)")
    sv.add_argument("--engine", choices=["peft", "vllm"], default="peft",
                    help="peft: serve here (CPU or GPU); vllm: write a Ray Serve LLM config for a GPU cluster")
    sv.add_argument("--run", action="store_true", help="with --engine vllm: also deploy the written config")
    sv.add_argument("--stop", action="store_true", help="stop the `lorapipe serve` running on --port")
    sv.add_argument("--lora-path", help="--engine vllm: cloud folder the adapters are loaded from (s3://, gs://, ...)")
    sv.add_argument("--out", default="lorapipe-llm.yaml", help="--engine vllm: the Serve config file to write")
    sv.add_argument("--max-batch-size", type=int, default=16, help="rows per generate() (any mix of adapters)")
    sv.add_argument("--max-ongoing", type=int, default=64, help="requests in the replica at once")
    sv.add_argument("--max-queued", type=int, default=512, help="requests waiting beyond that; more get HTTP 503")
    sv.add_argument("--request-timeout", type=float, default=120.0, metavar="S", help="end-to-end HTTP timeout")
    sv.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, sqlite:///mlflow.db")
    sv.set_defaults(fn=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lorapipe", description="QLoRA/LoRA fine-tuning on Ray Train + DeepSpeed, "
                                "Ray Tune search, MLflow registry with gated promotion.")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(name: str, help: str, fn: Callable) -> argparse.ArgumentParser:
        sp = add_config_parser(sub, name, help)
        sp.set_defaults(fn=fn)
        return sp

    with_config("validate", "check a config and print the resolved form", cmd_validate)
    dr = with_config("data", "know your data: rows, token lengths, truncation, packing efficiency per source", cmd_data)
    dr.add_argument("--sample", type=int, default=2000, help="rows of each source to tokenize (default 2000)")
    dr.add_argument("--json", action="store_true", help="print the report as JSON")
    t = with_config("train", "one Ray Train run -> run directory (+ MLflow run)", cmd_train)
    t.add_argument("--no-progress", action="store_true", help="no live progress bar")
    t.add_argument("--force", action="store_true", help="start even if `lorapipe plan` says it does not fit")
    t.add_argument("--resume", metavar="STORAGE_PATH",
                   help="continue an interrupted run from its latest checkpoint (e.g. runs/_ray/<run name>), "
                        "with the config saved in it; overrides are refused")

    mg = sub.add_parser("merge", help="dequantize-then-merge a run's adapter -> HF safetensors model")
    mg.add_argument("run_dir")
    mg.add_argument("out_dir")
    mg.add_argument("--onto", default="trained", help="trained (default: the base as training saw it) or original")
    mg.set_defaults(fn=cmd_merge)

    rg = sub.add_parser("register", help="log adapter + merged model to MLflow, register two versions "
                        "(a full fine-tuning run: its model, one version)")
    rg.add_argument("run_dir")
    rg.add_argument("--name", help="registered model base name (default: registry.name or the run name)")
    rg.add_argument("--tracking-uri", help="default: the run's config, $MLFLOW_TRACKING_URI, sqlite:///mlflow.db")
    rg.add_argument("--suite", help="gate suite YAML for a model registered for the first time")
    rg.add_argument("--merged", help="a `lorapipe merge` output of this run (else merged here)")
    rg.set_defaults(fn=cmd_register)

    sy = sub.add_parser("sync", help="log a run's metrics MLflow missed (server was away) and finish its run")
    sy.add_argument("run_dir")
    sy.add_argument("--tracking-uri", help="default: the run's config, $MLFLOW_TRACKING_URI, sqlite:///mlflow.db")
    sy.set_defaults(fn=cmd_sync)

    pr = sub.add_parser("promote", help="move an alias to a version if it beats the current one")
    pr.add_argument("name", help="registered model name, e.g. tiny-reverse-merged")
    pr.add_argument("version")
    pr.add_argument("--alias", default="champion")
    pr.add_argument("--force", action="store_true", help="promote even if the gate says no (recorded as tags)")
    pr.add_argument("--reason", default="", help="why (recorded with --force)")
    pr.add_argument("--tracking-uri")
    pr.set_defaults(fn=cmd_promote)

    rs = sub.add_parser("registry", help="list registered models, or show one's versions and aliases")
    rs.add_argument("action", choices=["list", "show", "set-gate"])
    rs.add_argument("name", nargs="?")
    rs.add_argument("--suite", help="set-gate: the suite YAML every promotion of NAME is judged on")
    rs.add_argument("--tracking-uri")
    rs.set_defaults(fn=cmd_registry)

    tn = with_config("tune", "Ray Tune search -> trial run dirs, best config YAML, plot", cmd_tune)
    tn.add_argument("--resume", action="store_true", help="continue a search whose driver died")
    tn.add_argument("--no-progress", action="store_true")
    tn.add_argument("--force", action="store_true", help="start even if `lorapipe plan` says a trial does not fit")
    ab = sub.add_parser("ablate", help="one classic LoRA table: rank | targets | method | variant, as a Tune grid "
                        "evaluated on the config's eval suite -> table.md, table.csv, plot.png")
    ab.__class__ = IntermixedParser
    ab.add_argument("kind", help="rank | targets | method | variant")
    ab.add_argument("config", help="YAML config with an eval: section (see configs/tiny-cpu-ablate.yaml)")
    ab.add_argument("overrides", nargs="*", help="dotted KEY=VALUE overrides, e.g. train.lr=1e-4")
    ab.add_argument("--values", nargs="+", help="values to compare (default: rank 1 4 8 16 64 full; targets q qk qkv "
                    "qkvo mlp all-linear; method lora qlora full; variant lora rslora dora loraplus)")
    ab.add_argument("--out", help="output folder (default: <run.output_dir>/ablate-<config name>-<kind>)")
    ab.add_argument("--no-progress", action="store_true")
    ab.add_argument("--force", action="store_true", help="start even if `lorapipe plan` says a trial does not fit")
    ab.set_defaults(fn=cmd_ablate)
    pl = with_config("pipeline", "tune (if configured) -> train best -> register -> promote", cmd_pipeline)
    pl.add_argument("--no-progress", action="store_true")
    pl.add_argument("--force", action="store_true", help="start even if `lorapipe plan` says it does not fit")

    from pipelines.plan.verdict import add_plan_arguments, cmd_plan

    pn = sub.add_parser("plan", help="predict memory per GPU, step time and cost from the config alone")
    pn.__class__ = IntermixedParser
    add_plan_arguments(pn)
    pn.set_defaults(fn=cmd_plan)

    from pipelines.cluster.submit import add_submit_commands

    add_submit_commands(sub)

    from pipelines.eval.commands import add_eval_commands
    from pipelines.registry.commands import add_rollback_command

    add_eval_commands(sub)
    add_rollback_command(sub)
    add_serve_parser(sub)

    d = sub.add_parser("demo", help="the embedded end-to-end run (`make demo`)")
    d.add_argument("--workdir", default=".demo", help="where the demo writes its base model, data and runs")
    d.add_argument("--quick", action="store_true", help="fewer steps (a smoke run, not a convincing result)")
    d.set_defaults(fn=cmd_demo)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    _quiet_libraries()
    from lora import LoraInputError
    from pipelines.core.errors import UserError

    args = build_parser().parse_args(argv)
    if args.command not in ("validate", "plan", "jobs", "registry", "promote", "sync", "rollback"):
        # Model-loading commands: transformers' per-shard progress bars are noise next to ours.
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        return args.fn(args)
    except (UserError, LoraInputError) as e:
        print(f"lorapipe: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lorapipe: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # MLflow refused the credentials or a permission: one line, not a traceback
        from pipelines.tracking.auth import access_error

        denied = access_error(e)
        if denied is None:
            raise
        print(f"lorapipe: error: {denied}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
