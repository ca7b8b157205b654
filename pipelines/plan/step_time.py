"""Step time, throughput and cost of a fine-tuning job from FLOPs, utilisation and ZeRO traffic.

FLOPs per token: forward 2 per multiplied parameter; backward 2 more for the activation
gradients (frozen base, LoRA) or 4 (full fine-tuning, weight gradients too); gradient
checkpointing replays the forward once more. So about 4N for LoRA/QLoRA, 6N for full, each +2N
with checkpointing. Attention adds 4*layers*seq*width per token forward (QK^T and AV, counted
without the causal half, as in PaLM's MFU), and its backward is twice that in every method.
The utilisation that turns peak FLOP/s into achieved FLOP/s comes from anchors measured with this
same formula (configs/gpus/catalogue.yaml), so the convention cancels out.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pipelines.core.defaults import GPU_CATALOGUE_PATH
from pipelines.plan.memory import DTYPE_BYTES, PlanInputs

NCCL_EFFICIENCY = 0.75   # achieved / nominal link bandwidth for large ring collectives


@dataclass(frozen=True)
class TimePlan:
    flops_per_token: float
    tokens_per_step_per_gpu: int
    compute_s: float            # per optimizer step
    comm_bytes_per_gpu: float   # sent per GPU per optimizer step
    comm_s: float
    step_s: float
    tokens_per_s_per_gpu: float
    total_h: float
    gpu_hours: float
    cost: float
    utilization: float
    bandwidth_gbps: float


def flops_per_token(p: PlanInputs) -> float:
    a = p.arch
    n = a.matmul_params()
    backward = 4 if p.method == "full" else 2
    passes = 1 + p.checkpointed_layers() / a.layers  # checkpointed layers replay their forward
    dense = 2 * n * passes + backward * n
    attn_fwd = 4 * a.layers * p.seq_len * a.heads * a.dim_head
    attention = attn_fwd * (passes + 2)
    adapter = 0 if p.method == "full" else 6 * p.adapter_params()
    return dense + attention + adapter


def comm_bytes_per_step(p: PlanInputs) -> float:
    """Bytes each GPU sends per optimizer step with ring collectives ((N-1)/N of each buffer)."""
    n = p.num_gpus
    if n <= 1:
        return 0.0
    ring = (n - 1) / n
    grads = p.adapter_params() * p.trainable_bytes()
    if p.zero_stage <= 1:
        return 2 * ring * grads                      # one all-reduce at the accumulation boundary
    sent = p.grad_accum * ring * grads               # reduce-scatter after every micro batch's backward
    if p.zero_stage == 2:
        return sent + ring * grads                   # all-gather of the updated partitions
    a = p.arch
    if p.quantized:
        params = a.linear_params() * 4 / 8 + a.dense_params() * DTYPE_BYTES[p.dtype]
    else:
        params = a.total_params() * DTYPE_BYTES[p.dtype]
    if p.method == "lora":
        params += grads
    # Parameters are all-gathered for the forward and again for the backward (or its recompute).
    return sent + p.grad_accum * 2 * ring * params


def plan_time(p: PlanInputs, *, peak_tflops: float, utilization: float, bandwidth_gbps: float,
              price_per_gpu_hour: float) -> TimePlan:
    """`bandwidth_gbps`: per-GPU link bandwidth in Gbit/s, one direction."""
    fpt = flops_per_token(p)
    tokens = p.micro_batch * p.seq_len * p.grad_accum
    compute = fpt * tokens / (peak_tflops * 1e12 * utilization)
    comm_bytes = comm_bytes_per_step(p)
    comm = comm_bytes / (bandwidth_gbps / 8 * 1e9 * NCCL_EFFICIENCY) if comm_bytes else 0.0
    # ZeRO-3 prefetches parameters while computing; gradient reduction overlaps only if asked to.
    overlapped = p.overlap_comm or p.zero_stage == 3
    step = max(compute, comm) if overlapped else compute + comm
    total_h = step * p.max_steps / 3600
    gpu_h = total_h * p.num_gpus
    return TimePlan(fpt, tokens, compute, comm_bytes, comm, step, tokens / step, total_h, gpu_h,
                    gpu_h * price_per_gpu_hour, utilization, bandwidth_gbps)


# -- the GPU catalogue (configs/gpus/catalogue.yaml) -------------------------------------------


@dataclass(frozen=True)
class GpuSpec:
    name: str
    description: str
    memory_gib: Optional[float]       # None: CPU mode, the host's RAM
    bf16_tflops: float
    intra_node_gbps: float
    inter_node_gbps: float
    gpus_per_node: int
    price_per_gpu_hour: float
    utilization: dict[str, float]     # lora / qlora / full


@dataclass(frozen=True)
class Catalogue:
    default_gpu: str
    gpus: dict[str, GpuSpec]


def load_catalogue(path: Path = GPU_CATALOGUE_PATH) -> Catalogue:
    import yaml

    data = yaml.safe_load(Path(path).read_text())
    anchors = data["utilization"]
    gpus = {name: GpuSpec(name=name, description=g["description"], memory_gib=g["memory_gib"],
                          bf16_tflops=float(g["bf16_tflops"]), intra_node_gbps=float(g["intra_node_gbps"]),
                          inter_node_gbps=float(g["inter_node_gbps"]), gpus_per_node=int(g["gpus_per_node"]),
                          price_per_gpu_hour=float(g["price_per_gpu_hour"]),
                          utilization={**anchors, **g.get("utilization", {})})
            for name, g in data["gpus"].items()}
    return Catalogue(default_gpu=data["default_gpu"], gpus=gpus)


def gpu_spec(name: str, catalogue: Optional[Catalogue] = None) -> GpuSpec:
    catalogue = catalogue or load_catalogue()
    spec = catalogue.gpus.get(name.lower())
    if spec is None:
        from pipelines.core.errors import UserError

        raise UserError(f"unknown GPU {name!r}; known: {', '.join(catalogue.gpus)}")
    return spec
