"""`lorapipe plan`: will this config fit on these GPUs, and how long and how much will it take?

From the config alone (the model's shape, never its weights): memory per GPU part by part with
ZeRO partitioning (pipelines/plan_memory.py), step time, throughput and cost
(pipelines/plan_time.py), a FITS / DOES NOT FIT verdict against configs/gpus/catalogue.yaml, and
the knobs that would make a plan fit. Every command that trains prints `fit_verdict` first.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pipelines.core.errors import UserError
from pipelines.plan.levers import (
    checkpointing_fields,
    describe_checkpointing,
    describe_loss,
    fastest_fitting,
    loss_chunks,
)
from pipelines.plan.memory import Arch, GiB, MemoryPlan, PlanInputs, arch_from_hf_config, plan_memory
from pipelines.plan.step_time import GpuSpec, TimePlan, gpu_spec, load_catalogue, plan_time


@dataclass(frozen=True)
class Knob:
    """One change that moves memory: the overrides to paste, and the plan's total after it."""

    overrides: tuple[str, ...]
    total: float
    host: float     # offloaded bytes per GPU that host RAM must hold
    fits: bool


@dataclass(frozen=True)
class Plan:
    inputs: PlanInputs
    gpu: GpuSpec
    memory: MemoryPlan
    time: TimePlan
    budget: float                  # bytes one GPU (or, in CPU mode, one worker's share of RAM) offers
    knobs: tuple[Knob, ...] = ()

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.budget

    @property
    def unit(self) -> str:
        return "worker" if self.inputs.cpu else "GPU"


# -- the model's shape -------------------------------------------------------------------------
def _read_config_json(path: Path, source: str) -> Arch:
    try:
        return arch_from_hf_config(json.loads(path.read_text()))
    except KeyError as e:
        raise UserError(f"{source}: config.json has no {e.args[0]!r}; planning needs a Llama-style decoder") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{source}: cannot read {path}: {e}") from None


def _builtin_tiny_arch() -> Arch:
    from lora.tiny import SPECIAL_TOKENS
    from pipelines.data.builtin import TINY_SHAPE, tokenizer_corpus

    # The builtin's tokenizer has one token per distinct character of its corpus, plus the specials.
    vocab = len(set("".join(tokenizer_corpus()))) + len(SPECIAL_TOKENS)
    return Arch(hidden=TINY_SHAPE["hidden"], intermediate=TINY_SHAPE["intermediate"], layers=TINY_SHAPE["layers"],
                heads=TINY_SHAPE["heads"], kv_heads=TINY_SHAPE["heads"], vocab=vocab)


def _hub_config(repo: str, revision: Optional[str]) -> Optional[Path]:
    """config.json from the local HF cache, or from the hub unless HF_HUB_OFFLINE is set."""
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache
    except ImportError:
        return None
    if repo.startswith((".", "/", "~")) or repo.count("/") != 1:
        return None  # a local path that is not there, not a hub id
    try:
        cached = try_to_load_from_cache(repo, "config.json", revision=revision)
    except Exception:  # an id the hub would refuse
        return None
    if isinstance(cached, str):
        return Path(cached)
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no"):
        return None
    try:
        return Path(hf_hub_download(repo, "config.json", revision=revision, etag_timeout=5))
    except Exception:  # no network, gated repo, unknown id: fall through to "shape unknown"
        return None


def resolve_arch(cfg) -> Arch:
    """Local config.json, then the HF cache, then `model.shape`, then the hub."""
    m = cfg.model
    if m.path in ("builtin:tiny-llama", "builtin:tiny-llama-pretrained"):  # one shape, two weight sets
        return _builtin_tiny_arch()
    local = Path(m.path).expanduser() / "config.json"
    if local.is_file():
        return _read_config_json(local, m.path)
    if m.shape is not None:
        s = m.shape
        return Arch(hidden=s.hidden_size, intermediate=s.intermediate_size, layers=s.num_hidden_layers,
                    heads=s.num_attention_heads, kv_heads=s.num_key_value_heads or s.num_attention_heads,
                    vocab=s.vocab_size, tie_embeddings=s.tie_word_embeddings)
    found = _hub_config(m.path, m.revision)
    if found is not None:
        return _read_config_json(found, m.path)
    raise UserError(f"model shape unknown for {m.path}: give model.shape or a local path with config.json")


# -- config -> inputs -> plan ------------------------------------------------------------------
def plan_inputs(cfg, arch: Arch, num_gpus: int, cpu: bool) -> PlanInputs:
    """Our workers run DeepSpeed with bf16/fp16 enabled for 16-bit models: precision "mixed".
    activation_checkpointing=auto is planned as `all` here, micro_batch_size=auto as 1; `plan_for_config`
    resolves both."""
    m, t, ds, lora = cfg.model, cfg.train, cfg.deepspeed, cfg.lora
    micro = 1 if t.micro_batch_size == "auto" else t.micro_batch_size
    targets = lora.target_modules if isinstance(lora.target_modules, str) else tuple(lora.target_modules)
    ckpt = checkpointing_fields("all" if m.activation_checkpointing == "auto" else m.activation_checkpointing,
                                m.checkpoint_every_k)
    return PlanInputs(
        arch=arch, num_gpus=num_gpus, method="full" if cfg.is_full else "lora",
        dtype=m.dtype, quantization=m.quantization, double_quant=m.double_quant,
        lora_r=lora.r, lora_dropout=lora.dropout, use_dora=lora.use_dora, lora_targets=targets, precision="mixed",
        seq_len=cfg.data.max_seq_len, micro_batch=micro, grad_accum=cfg.batch_per_worker() // micro,
        max_steps=t.max_steps,
        attn_implementation=m.attn_implementation, **ckpt,
        loss_chunks=loss_chunks(t.loss, t.loss_chunk_tokens, micro * cfg.data.max_seq_len),
        keeps_logits=False,  # the worker keeps only the loss of the model's output
        zero_stage=ds.stage, offload_optimizer=ds.offload_optimizer != "none",
        offload_params=ds.offload_params != "none", overlap_comm=ds.overlap_comm, cpu=cpu)


def host_ram_bytes() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def budget_bytes(gpu: GpuSpec, inputs: PlanInputs) -> float:
    if gpu.memory_gib is None:  # CPU mode: the workers share this host's RAM
        return host_ram_bytes() / inputs.num_gpus
    return gpu.memory_gib * GiB


def make_plan(inputs: PlanInputs, gpu: GpuSpec, *, utilization: Optional[float] = None,
              price_per_gpu_hour: Optional[float] = None, interconnect_gbps: Optional[float] = None,
              with_knobs: bool = True) -> Plan:
    if inputs.num_gpus < 1:
        raise UserError(f"--gpus must be at least 1, got {inputs.num_gpus}")
    if utilization is not None and not 0 < utilization <= 1:
        raise UserError(f"--utilization must be in (0, 1], got {utilization}")
    method = "full" if inputs.method == "full" else ("qlora" if inputs.quantized else "lora")
    if interconnect_gbps is None:
        interconnect_gbps = gpu.intra_node_gbps if inputs.num_gpus <= gpu.gpus_per_node else gpu.inter_node_gbps
    memory = plan_memory(inputs)
    time = plan_time(inputs, peak_tflops=gpu.bf16_tflops, utilization=utilization or gpu.utilization[method],
                     bandwidth_gbps=interconnect_gbps,
                     price_per_gpu_hour=gpu.price_per_gpu_hour if price_per_gpu_hour is None else price_per_gpu_hour)
    plan = Plan(inputs, gpu, memory, time, budget_bytes(gpu, inputs))
    if with_knobs and not plan.fits:
        plan = Plan(inputs, gpu, memory, time, plan.budget, tuple(suggest_knobs(plan)))
    return plan


def plan_for_config(cfg, gpus: Optional[int] = None, gpu: Optional[str] = None, *,
                    utilization: Optional[float] = None, price_per_gpu_hour: Optional[float] = None,
                    interconnect_gbps: Optional[float] = None) -> Plan:
    """The plan for a validated PipelineConfig; gpus defaults to scaling.num_workers, gpu to
    scaling.gpu_kind (else the catalogue's default) when scaling.use_gpu, else CPU mode. Raises UserError on bad input."""
    catalogue = load_catalogue()
    name = gpu or ((cfg.scaling.gpu_kind or catalogue.default_gpu) if cfg.scaling.use_gpu else "cpu")
    spec = gpu_spec(name, catalogue)
    n = cfg.scaling.num_workers if gpus is None else gpus
    if n < 1:
        raise UserError(f"--gpus must be at least 1, got {n}")
    inputs = plan_inputs(cfg, resolve_arch(cfg), n, cpu=spec.memory_gib is None)
    inputs = resolve_auto_inputs(cfg, inputs, budget_bytes(spec, inputs))
    return make_plan(inputs, spec, utilization=utilization, price_per_gpu_hour=price_per_gpu_hour,
                     interconnect_gbps=interconnect_gbps)


def resolve_auto_inputs(cfg, inputs: PlanInputs, budget: float) -> PlanInputs:
    """`inputs` with the config's `auto` settings (checkpointing, micro batch) chosen for `budget` bytes."""
    ckpt_auto, micro_auto = cfg.model.activation_checkpointing == "auto", cfg.train.micro_batch_size == "auto"
    if not (ckpt_auto or micro_auto):
        return inputs
    t = cfg.train
    return fastest_fitting(inputs, budget, checkpointing=ckpt_auto,
                           batch_per_worker=cfg.batch_per_worker() if micro_auto else None,
                           chunk_tokens=None if t.loss == "plain" else t.loss_chunk_tokens)


def fit_verdict(cfg, *, force: bool = False, configs: Optional[list] = None) -> str:
    """The one line `train`, `tune`, `pipeline` and `submit` print before starting anything.
    With a tune section, every searched value is planned too (one key at a time on the base
    config) and the largest is the verdict: a search must not fail on its biggest trial. Raises
    UserError when a plan does not fit and `force` is false; a model whose shape is unknown is
    not planned (and not refused). `configs`: plan these instead (an ablation's trials)."""
    try:
        plans = [plan_for_config(c) for c in (configs or configs_to_plan(cfg))]
    except UserError as e:
        return f"plan: skipped ({e})"
    plan = max(plans, key=lambda p: p.memory.total / p.budget)
    what = "trial" if configs else "searched"
    line = verdict_line(plan) + (f" (largest of {len(plans)} {what} settings)" if len(plans) > 1 else "")
    if not plan.fits and not force:
        raise UserError(f"{line}: refusing to start; see `lorapipe plan` for what would fit, or pass --force")
    return line


def configs_to_plan(cfg) -> list:
    """The config itself, and with a tune section, the config with each searched value applied."""
    from pipelines.config.load import apply_trial_values

    if cfg.tune is None:
        return [cfg]
    return [cfg] + [apply_trial_values(cfg, {key: value}) for key, dist in cfg.tune.space.items()
                    for value in dist.probe_values()]


# -- what would make it fit --------------------------------------------------------------------
def _candidates(p: PlanInputs) -> list[tuple[tuple[str, ...], dict]]:
    """(overrides, PlanInputs changes) one knob at a time, cheapest in speed first."""
    out: list[tuple[tuple[str, ...], dict]] = []
    storage = (f"model.quant_storage={p.dtype}",) if p.quantized else ()
    if p.checkpointed_layers() < p.arch.layers // 2 and p.arch.layers > 1:
        out.append((("model.activation_checkpointing=every_k", "model.checkpoint_every_k=2"),
                    {"gradient_checkpointing": True, "checkpoint_every": 2}))
    if p.checkpointed_layers() < p.arch.layers:
        out.append((("model.activation_checkpointing=all",), {"gradient_checkpointing": True, "checkpoint_every": 1}))
    if p.micro_batch > 1:
        accum = p.grad_accum * p.micro_batch
        out.append((("train.micro_batch_size=1", f"train.grad_accum={accum}"), {"micro_batch": 1, "grad_accum": accum}))
    if p.num_gpus > 1 and p.zero_stage < 3:
        out.append((("deepspeed.stage=3",) + storage, {"zero_stage": 3}))
    if not p.quantized and p.method == "lora":
        extra = (f"model.quant_storage={p.dtype}",) if p.zero_stage == 3 else ()
        out.append((("model.quantization=nf4",) + extra, {"quantization": "nf4"}))
    if not p.offload_optimizer:
        stage = max(p.zero_stage, 2)
        out.append(((f"deepspeed.stage={stage}", "deepspeed.offload_optimizer=cpu"),
                     {"zero_stage": stage, "offload_optimizer": True}))
    if not p.offload_params:
        out.append((("deepspeed.stage=3", "deepspeed.offload_params=cpu", "deepspeed.offload_optimizer=cpu") + storage,
                     {"zero_stage": 3, "offload_params": True, "offload_optimizer": True}))
    return out


def _loss_candidates(p: PlanInputs) -> list[tuple[tuple[str, ...], dict]]:
    """The chunked loss, alone: it is not combined with knobs that may move to ZeRO-3, which it does not support."""
    if p.loss_chunks > 1 or p.tokens_per_micro_batch <= 1024 or p.zero_stage == 3:
        return []
    return [(("train.loss=chunked",), {"loss_chunks": -(-p.tokens_per_micro_batch // 1024)})]


def _merge(overrides: list[str], keys: tuple[str, ...]) -> list[str]:
    """Overrides of both, a later value of the same key replacing the earlier one."""
    merged = {o.split("=", 1)[0]: o for o in overrides}
    merged.update({k.split("=", 1)[0]: k for k in keys})
    return list(merged.values())


def suggest_knobs(plan: Plan) -> list[Knob]:
    """Each knob alone; if none fits alone, knobs added in order until it fits; then the fewest
    GPUs that fit under ZeRO-3."""
    p, knobs = plan.inputs, []

    def knob(keys, inputs: PlanInputs) -> Knob:
        m = plan_memory(inputs)
        return Knob(tuple(keys), m.total, m.host_per_gpu, m.total <= plan.budget)

    candidates = _candidates(p)
    knobs = [knob(keys, p.with_(**change)) for keys, change in candidates + _loss_candidates(p)]
    if candidates and not any(k.fits for k in knobs):
        combined, overrides = {}, []
        for keys, change in candidates:
            combined.update(change)
            overrides = _merge(overrides, keys)
            if plan_memory(p.with_(**combined)).total <= plan.budget:
                break
        knobs.append(knob(overrides, p.with_(**combined)))
    if not p.cpu:
        # More GPUs shrink weights and states under ZeRO-3, not activations: pair with the activation knobs.
        keys, change = ["deepspeed.stage=3"] + ([f"model.quant_storage={p.dtype}"] if p.quantized else []), {}
        for k, c in candidates:
            if {"gradient_checkpointing", "micro_batch"} & set(c) and c.get("checkpoint_every", 1) == 1:
                keys, change = _merge(keys, k), {**change, **c}
        for n in (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024):
            more = p.with_(zero_stage=3, num_gpus=n, **change)
            if n > p.num_gpus and plan_memory(more).total <= plan.budget:
                knobs.append(knob([f"--gpus {n}"] + keys, more))
                break
    return knobs


# -- output ------------------------------------------------------------------------------------
def _gib(x: float) -> str:
    return f"{x / GiB:,.2f}"


def _hours(h: float) -> str:
    if h < 1 / 60:
        return f"{h * 3600:.0f} s"
    return f"{h * 60:.0f} min" if h < 1 else (f"{h:,.1f} h" if h < 48 else f"{h / 24:,.1f} days")


def describe_method(p: PlanInputs) -> str:
    if p.method == "full":
        return f"full fine-tuning {p.dtype} ({p.adapter_params() / 1e9:,.2f}B trainable)"
    return f"{'QLoRA ' + p.quantization if p.quantized else 'LoRA ' + p.dtype}, r={p.lora_r}"


def verdict_line(plan: Plan) -> str:
    """One line: 'plan: 7.9 GiB/GPU of 79.6 GiB on 8x h100 - FITS; ~2,950 tok/s/GPU, 3.1 h, $98'."""
    p, t = plan.inputs, plan.time
    where = f"{p.num_gpus}x cpu worker" if p.cpu else f"{p.num_gpus}x {plan.gpu.name}"
    of = f"{plan.budget / GiB:,.1f} GiB" + (" RAM share" if p.cpu else "")
    cost = f", ${t.cost:,.0f}" if t.cost >= 1 else ""
    return (f"plan: {plan.memory.total / GiB:,.1f} GiB/{plan.unit} of {of} on {where} - "
            f"{'FITS' if plan.fits else 'DOES NOT FIT'}; ~{t.tokens_per_s_per_gpu:,.0f} tok/s/{plan.unit}, "
            f"{_hours(t.total_h)}{cost}")


def render_plan(plan: Plan, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    p, m, t, n = plan.inputs, plan.memory, plan.time, plan.inputs.num_gpus
    a = p.arch
    console.print(f"[bold]{a.total_params() / 1e9:,.2f}B-parameter Llama-style model[/] (hidden {a.hidden}, "
                  f"{a.layers} layers, {a.heads}/{a.kv_heads} heads, vocab {a.vocab:,}); "
                  f"{describe_method(p)}, "
                  f"ZeRO-{p.zero_stage} on {n}x {plan.gpu.name}; micro batch {p.micro_batch} x {p.seq_len} tokens "
                  f"(grad_accum {p.grad_accum}), "
                  f"checkpointing {describe_checkpointing(p)}, loss {describe_loss(p)}")
    mem = Table(title=f"Memory per {plan.unit} (GiB)")
    for col in ("part", "whole model", "per " + plan.unit, "host", "how"):
        mem.add_column(col, justify="left" if col in ("part", "how") else "right")
    for part in m.parts:
        mem.add_row(part.name, "" if part.full is None else _gib(part.full), _gib(part.per_gpu),
                    _gib(part.host) if part.host else "", part.note)
    verdict = "[green]FITS[/]" if plan.fits else "[red]DOES NOT FIT[/]"
    mem.add_row("[bold]total[/]", "", f"[bold]{_gib(m.total)}[/]", _gib(m.host_per_gpu) if m.host_per_gpu else "",
                f"of {_gib(plan.budget)} -> {verdict}")
    console.print(mem)
    tim = Table(title="Time and cost")
    tim.add_column("figure")
    tim.add_column("value", justify="right")
    rows = [("FLOPs per token", f"{t.flops_per_token / 1e9:,.1f} GFLOP"),
            ("tokens per step per " + plan.unit, f"{t.tokens_per_step_per_gpu:,}"),
            ("compute per step", f"{t.compute_s:,.2f} s at {t.utilization:.0%} of {plan.gpu.bf16_tflops:,g} TFLOP/s"),
            ("communication per step",
             f"{t.comm_bytes_per_gpu / GiB:,.2f} GiB, {t.comm_s:,.2f} s at {t.bandwidth_gbps:,g} Gbit/s"),
            ("step time", f"{t.step_s:,.2f} s"),
            ("throughput",
             f"{t.tokens_per_s_per_gpu:,.0f} tok/s/{plan.unit}, {t.tokens_per_s_per_gpu * n:,.0f} tok/s total"),
            (f"{p.max_steps:,} steps", _hours(t.total_h)),
            ("GPU-hours" if not p.cpu else "worker-hours", f"{t.gpu_hours:,.1f}"),
            ("cost", f"${t.cost:,.2f}")]
    for row in rows:
        tim.add_row(*row)
    console.print(tim)
    for note in m.notes:
        console.print(f"note: {note}")
    if plan.knobs:
        kt = Table(title="What would make it fit")
        kt.add_column("change (KEY=VALUE overrides)")
        kt.add_column(f"GiB/{plan.unit}", justify="right")
        kt.add_column("host GiB/GPU", justify="right")
        kt.add_column("fits")
        for k in plan.knobs:
            kt.add_row(" ".join(k.overrides), _gib(k.total), _gib(k.host) if k.host else "", "yes" if k.fits else "no")
        console.print(kt)
    console.print(verdict_line(plan))


# -- CLI ---------------------------------------------------------------------------------------
def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run config YAML")
    parser.add_argument("overrides", nargs="*", help="dotted KEY=VALUE overrides, e.g. train.micro_batch_size=1")
    parser.add_argument("--gpus", type=int, default=None, help="number of GPUs (default: scaling.num_workers)")
    parser.add_argument("--gpu", default=None, help="GPU kind from configs/gpus/catalogue.yaml (default: "
                        "scaling.gpu_kind, else h100; cpu when scaling.use_gpu is false)")
    parser.add_argument("--cpu", action="store_true", help="CPU mode: workers share this host's RAM, no CUDA overheads")
    parser.add_argument("--utilization", type=float, default=None,
                        help="achieved / peak FLOP/s (default: the catalogue's measured anchors)")
    parser.add_argument("--price-per-gpu-hour", type=float, default=None, help="USD per GPU-hour (default: catalogue)")
    parser.add_argument("--interconnect-gbps", type=float, default=None,
                        help="per-GPU link bandwidth for ZeRO collectives, Gbit/s (default: catalogue)")


def cmd_plan(args) -> int:
    from pipelines.config.load import load_config

    if args.cpu and args.gpu not in (None, "cpu"):
        raise UserError(f"--cpu and --gpu {args.gpu} contradict each other; give one")
    cfg = load_config(args.config, args.overrides)
    plan = plan_for_config(cfg, gpus=args.gpus, gpu="cpu" if args.cpu else args.gpu, utilization=args.utilization,
                           price_per_gpu_hour=args.price_per_gpu_hour, interconnect_gbps=args.interconnect_gbps)
    render_plan(plan)
    return 0
