"""`lorapipe eval` and `lorapipe generate`. Bad input: one line, exit 2."""
from __future__ import annotations

import json
import sys

from pipelines.core.defaults import default_tracking_uri
from pipelines.core.errors import UserError


def suite_for_target(model, suite_file, tracking_uri):
    """--suite FILE; else a registered version's gate suite; else its run config's eval section
    (or the default suite)."""
    from pipelines.eval.suite import suite_for_config

    if not suite_file and model.name:
        from pipelines.eval.gate import gate_suite
        from pipelines.tracking.runs import client

        gate = gate_suite(client(default_tracking_uri(tracking_uri)), model.name)
        if gate is not None:
            return gate.suite
    return suite_for_config(model.config, suite_file)


def cmd_eval(args) -> int:
    from pipelines.artifacts.resolve import resolve
    from pipelines.eval.run import evaluate

    model = resolve(args.target, args.tracking_uri)
    suite = suite_for_target(model, args.suite, args.tracking_uri)
    result = evaluate(model, suite, tracking_uri=args.tracking_uri)
    if args.json:
        print(json.dumps({"target": result.target, "kind": result.kind, "target_digest": result.digest,
                          "suite_fingerprint": result.fingerprint, "metrics": result.metrics,
                          "cached": not result.computed}, sort_keys=True))
        return 0
    print_results([{"model": result.target, **result.metrics}],
                  f"suite {result.fingerprint[:12]} ({'cached' if not result.computed else f'{result.seconds:.1f} s'})")
    return 0


def print_results(rows: list[dict], title: str) -> None:
    """Models side by side, one column each (their "model" label), one row per metric."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    for r in rows:
        table.add_column(str(r["model"]), justify="right")
    metrics = list(dict.fromkeys(k for r in rows for k, v in r.items() if isinstance(v, float)))
    for m in metrics:
        table.add_row(m, *[f"{r[m]:.4g}" if isinstance(r.get(m), float) else "-" for r in rows])
    Console().print(table)


def generation_settings(args):
    from pydantic import ValidationError

    from pipelines.config.eval_suite import GenerationSpec
    from pipelines.config.load import describe_validation_error

    try:
        return GenerationSpec(max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                              temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    except ValidationError as e:
        raise UserError(f"generate: {describe_validation_error(e, GenerationSpec)}") from None


def cmd_generate(args) -> int:
    import torch

    from pipelines.artifacts.resolve import load_for_inference, resolve
    from pipelines.data.prompts import completion_prompt, template_for
    from pipelines.eval.generation import stream_answer

    gen = generation_settings(args)
    model = resolve(args.target, args.tracking_uri)
    loaded, tokenizer = load_for_inference(model)
    template = template_for(model.config.data.format)
    torch.manual_seed(gen.seed)
    for prompt in prompts_from(args):
        text = completion_prompt(template, tokenizer, prompt, args.input or "")
        for piece in stream_answer(loaded, tokenizer, text, max_new_tokens=gen.max_new_tokens, do_sample=gen.do_sample,
                                   temperature=gen.temperature, top_p=gen.top_p):
            print(piece, end="", flush=True)
        print(flush=True)
    return 0


def prompts_from(args):
    """--prompt once; else one prompt per stdin line until EOF (a `> ` prompt on a terminal)."""
    if args.prompt is not None:
        yield args.prompt
        return
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        if line.strip():
            yield line.rstrip("\n")


def add_eval_commands(sub) -> None:
    ev = sub.add_parser("eval", help="evaluate a run dir, models:/NAME/VERSION, models:/NAME@ALIAS or base:<either>")
    ev.add_argument("target")
    ev.add_argument("--suite", help="suite YAML (default: the model's gate suite, the config's eval: section, "
                                    "or its own data)")
    ev.add_argument("--json", action="store_true", help="one JSON object: metrics, suite fingerprint, target digest")
    ev.add_argument("--tracking-uri", help="for models:/ targets; default $MLFLOW_TRACKING_URI, sqlite:///mlflow.db")
    ev.set_defaults(fn=cmd_eval)

    gn = sub.add_parser("generate", help="try a model by hand: streams its answer (greedy by default)")
    gn.add_argument("target")
    gn.add_argument("--prompt", help="one instruction; without it, one per stdin line until EOF")
    gn.add_argument("--input", help="the instruction's input (alpaca)")
    gn.add_argument("--max-new-tokens", type=int, default=64)
    gn.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gn.add_argument("--temperature", type=float, default=1.0)
    gn.add_argument("--top-p", type=float, default=1.0)
    gn.add_argument("--seed", type=int, default=0)
    gn.add_argument("--tracking-uri")
    gn.set_defaults(fn=cmd_generate)
