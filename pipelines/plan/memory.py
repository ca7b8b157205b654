"""Memory per GPU of a LoRA/QLoRA (or full) fine-tuning step, from the model's shape alone.

Pure arithmetic over a Llama-style decoder (no torch, no pydantic): `PlanInputs` holds every
setting that moves memory, `plan_memory` returns one `MemoryPart` per row of the plan's table,
each with its full size, how ZeRO divides it across the GPUs, and where it lives.

What the activation figures count is what autograd keeps alive in transformers' Llama
(RMSNorm upcasts its input to fp32; frozen linears keep no input; a LoRA layer keeps its input
for dA; SwiGLU keeps gate, SiLU and up outputs; the HF loss upcasts the logits to fp32), so the
figures can be checked against a real step (tests/integration/test_plan_measured.py: within a few
percent of torch.cuda.max_memory_allocated on an H100, and of RSS on CPU). The logits are counted
as alive through backward (a loop that keeps `outputs`); dropping them first saves 2 bytes/entry.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal, Optional, Union

from lora.targets import PRESET_ROLES

GiB = 1024 ** 3
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The Llama-style linears behind each role a lora.target_modules preset names.
ROLE_LINEARS = {"q": ("q_proj",), "k": ("k_proj",), "v": ("v_proj",), "o": ("o_proj",),
                "mlp": ("gate_proj", "up_proj", "down_proj")}
# Which linears read the same input tensor (a LoRA on any of them keeps that input alive).
INPUT_GROUPS = {"norm1": ("q_proj", "k_proj", "v_proj"), "attn_out": ("o_proj",),
                "norm2": ("gate_proj", "up_proj"), "act": ("down_proj",)}

# -- one set of constants, used for every model and every GPU ---------------------------------
# bitsandbytes 4-bit: 4 bits per weight plus its block constants. Without double quantization one
# fp32 absmax per 64 weights (+0.5 bit); with it the absmax is itself 8-bit with one fp32 per 256
# blocks (+8/64 + 32/(64*256) = +0.127 bit), the QLoRA paper's figure.
QUANT_BITS = {False: 4 + 32 / 64, True: 4 + 8 / 64 + 32 / (64 * 256)}
# Read on one H100 80GB (torch 2.11, CUDA 13) over three LoRA/QLoRA runs of 1B and 8B Llamas:
# nvidia-smi's used minus torch's reserved was 1.22 GiB each time (context, kernels, cuBLAS
# workspace), and reserved/allocated at the peak 1.015-1.05.
CUDA_CONTEXT_BYTES = int(1.2 * GiB)
FRAGMENTATION = 1.05
NCCL_BYTES = int(0.25 * GiB)           # NCCL communicator buffers once there is more than one GPU
# CPU mode: anonymous memory of Python with torch, transformers and peft imported (0.32 GiB read
# on x86-64 Linux, torch 2.13), and malloc's slack when freed tensors go back to the system (glibc
# with a fixed mmap threshold; its default heap can keep ~1.5x the live activations resident).
CPU_RUNTIME_BYTES = int(0.35 * GiB)
CPU_FRAGMENTATION = 1.05
DS_BUCKET_ELEMENTS = 500_000_000       # DeepSpeed reduce_bucket_size default (5e8 elements)
DS_MAX_LIVE_PARAMETERS = 1_000_000_000  # DeepSpeed stage3_max_live_parameters default


@dataclass(frozen=True)
class Arch:
    """A Llama-style decoder: the figures `lorapipe plan` needs, nothing loaded."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tie_embeddings: bool = False
    head_dim: Optional[int] = None

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.hidden // self.heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear in one decoder layer."""
        h, i, q, kv = self.hidden, self.intermediate, self.heads * self.dim_head, self.kv_heads * self.dim_head
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def layer_linear_params(self) -> int:
        return sum(a * b for a, b in self.linear_shapes().values())

    def linear_params(self) -> int:
        return self.layers * self.layer_linear_params()

    def dense_params(self) -> int:
        """Parameters bitsandbytes leaves unquantized: embeddings, output head, norms."""
        head = 0 if self.tie_embeddings else self.vocab * self.hidden
        return self.vocab * self.hidden + head + (2 * self.layers + 1) * self.hidden

    def total_params(self) -> int:
        return self.linear_params() + self.dense_params()

    def matmul_params(self) -> int:
        """Parameters multiplied per token (every linear and the output head; not the lookup)."""
        return self.linear_params() + self.vocab * self.hidden


def arch_from_hf_config(cfg: dict) -> Arch:
    """Arch from a transformers config.json dict (Llama-style keys; multimodal `text_config` too).

    Raises KeyError naming the first missing key.
    """
    cfg = cfg.get("text_config") or cfg
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                           "vocab_size") if not cfg.get(k)]
    if missing:
        raise KeyError(missing[0])
    return Arch(hidden=cfg["hidden_size"], intermediate=cfg["intermediate_size"], layers=cfg["num_hidden_layers"],
                heads=cfg["num_attention_heads"], kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
                vocab=cfg["vocab_size"], tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                head_dim=cfg.get("head_dim"))


Precision = Literal["mixed", "fp32-adapter", "pure"]


@dataclass(frozen=True)
class PlanInputs:
    """Every setting that moves memory or time. Built from a PipelineConfig, or directly in tests."""

    arch: Arch
    num_gpus: int = 1
    method: Literal["lora", "full"] = "lora"
    dtype: str = "bf16"                       # load / compute dtype of the base
    quantization: str = "nf4"                 # none | nf4 | fp4
    double_quant: bool = True
    lora_r: int = 16
    lora_targets: Union[str, tuple[str, ...]] = "all-linear"
    lora_dropout: float = 0.0
    use_dora: bool = False
    # mixed: DeepSpeed bf16/fp16 (16-bit trainable params and grads, fp32 master + Adam states);
    # fp32-adapter: bare PEFT (adapters autocast to fp32, fp32 grads and Adam states);
    # pure: everything in the model dtype, Adam states included (torchtune's bf16 recipes).
    precision: Precision = "mixed"
    seq_len: int = 2048
    micro_batch: int = 1
    grad_accum: int = 1
    max_steps: int = 1
    gradient_checkpointing: bool = False
    checkpoint_every: int = 1                 # with checkpointing: layers 0, k, 2k, ... are recomputed
    attn_implementation: str = "sdpa"         # sdpa | eager | flash (flash behaves as sdpa here)
    loss_chunks: int = 1                      # 1 = HF loss over full fp32 logits; >1 = chunked/fused CE
    keeps_logits: bool = True                 # the loop holds the model's output (logits) through backward
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    overlap_comm: bool = False
    cpu: bool = False                         # CPU mode: no CUDA context, host RAM as the budget

    def with_(self, **changes) -> "PlanInputs":
        return replace(self, **changes)

    @property
    def quantized(self) -> bool:
        return self.quantization != "none"

    @property
    def tokens_per_micro_batch(self) -> int:
        return self.micro_batch * self.seq_len

    def checkpointed_layers(self) -> int:
        """Decoder layers recomputed in backward (transformers checkpoints index % k == 0)."""
        if not self.gradient_checkpointing:
            return 0
        return -(-self.arch.layers // max(1, self.checkpoint_every))

    def targeted(self) -> tuple[str, ...]:
        if self.method == "full":
            return LINEARS
        if self.lora_targets == "all-linear":
            return LINEARS
        if isinstance(self.lora_targets, str):  # a preset: its roles on a Llama-style decoder
            named = {n for role in PRESET_ROLES[self.lora_targets] for n in ROLE_LINEARS[role]}
            return tuple(n for n in LINEARS if n in named)
        return tuple(n for n in LINEARS if any(n == t or t.endswith("." + n) for t in self.lora_targets))

    def adapter_params(self) -> int:
        if self.method == "full":
            return self.arch.total_params()
        shapes = self.arch.linear_shapes()
        per_layer = sum(self.lora_r * (shapes[n][0] + shapes[n][1]) for n in self.targeted())
        if self.use_dora:
            per_layer += sum(shapes[n][1] for n in self.targeted())
        return per_layer * self.arch.layers

    def trainable_bytes(self) -> int:
        """Bytes per trainable parameter for weights (the optimizer's view is `optimizer_bytes`)."""
        if self.precision == "fp32-adapter" and self.method == "lora":
            return 4
        return DTYPE_BYTES[self.dtype]

    def optimizer_bytes(self) -> int:
        """AdamW bytes per trainable parameter: m and v, plus an fp32 master copy if weights are 16-bit."""
        if self.precision == "pure":
            return 2 * DTYPE_BYTES[self.dtype]
        master = 4 if self.trainable_bytes() < 4 else 0
        return 8 + master


@dataclass(frozen=True)
class MemoryPart:
    """One row of the plan: `full` bytes before partitioning, `per_gpu` after, `host` if offloaded."""

    name: str
    full: Optional[float]      # None for what exists per GPU only (activations, buffers, context)
    per_gpu: float
    host: float = 0.0
    note: str = ""


@dataclass(frozen=True)
class MemoryPlan:
    parts: tuple[MemoryPart, ...]
    allocated_peak: float      # tensors alive at the step's peak, per GPU
    overhead: float            # context / runtime bytes outside the allocator
    total: float               # what the device (or the process, in CPU mode) must hold
    host_per_gpu: float = 0.0  # offloaded bytes per rank in host RAM
    notes: tuple[str, ...] = field(default_factory=tuple)

    def part(self, name: str) -> float:
        return sum(x.per_gpu for x in self.parts if x.name == name)

    @property
    def loaded(self) -> float:
        """Footprint once the model and adapter are loaded, before any step (weights + context)."""
        return self.part("base weights") + self.part("adapter weights") + self.overhead


def activation_bytes_per_token(p: PlanInputs) -> float:
    """Bytes autograd keeps per token for one decoder layer (no checkpointing)."""
    a, b, ab = p.arch, DTYPE_BYTES[p.dtype], p.trainable_bytes()
    q_out, h, i = a.heads * a.dim_head, a.hidden, a.intermediate
    saved = 2 * 4 * h                       # both RMSNorms keep an fp32 copy of their input
    saved += b * q_out * 2                  # q after RoPE; attention output (also o_proj's input)
    saved += b * q_out * 2                  # k, v as attention sees them (repeat_kv expands GQA)
    if p.attn_implementation == "eager":    # softmax kept in fp32 and its cast for the AV product
        saved += a.heads * p.seq_len * (4 + b)
    saved += b * 3 * i                      # SwiGLU: gate output (SiLU), SiLU output and up output
    widths = {"norm1": h, "attn_out": q_out, "norm2": h, "act": i}
    targeted = set(p.targeted())
    for group, members in INPUT_GROUPS.items():
        hit = [m for m in members if m in targeted]
        if not hit:
            continue
        w = widths[group]
        if p.method == "full":
            saved += b * w if group != "attn_out" else 0  # linears keep their inputs for dW
        elif p.lora_dropout > 0:
            saved += len(hit) * w * (ab + 1)    # each LoRA layer's dropout output and its mask
        elif ab != b:
            saved += len(hit) * w * ab          # each LoRA layer casts its input to the adapter dtype
        elif group != "attn_out":
            saved += b * w                      # the norm output / SwiGLU product the LoRA layers read
        saved += 0 if p.method == "full" else len(hit) * p.lora_r * ab  # lora_A outputs, kept for dB
    return saved


def backward_working_bytes_per_token(p: PlanInputs) -> float:
    """Gradients in flight while one layer's backward runs (MLP intermediates and the hidden state)."""
    a, b = p.arch, DTYPE_BYTES[p.dtype]
    return b * (3 * a.intermediate + 2 * a.hidden) + 4 * a.hidden


def logits_bytes_per_token(p: PlanInputs) -> float:
    """Peak of the loss per token.

    HF's loss (one chunk): backward holds the fp32 log-softmax output (4), the NLL gradient (4) and
    the log-softmax gradient (4) per vocabulary entry, plus the model-dtype logits (b) when the loop
    keeps the model's output alive (lorapipe's worker does not; the measured loops here did):
    fp32 CPU steps 16 or 12 bytes, bf16 14 or 12. The chunked loss (lora/loss.py) holds one chunk:
    its model-dtype logits when they are not fp32 (b), their fp32 copy, and logsumexp's temporary
    (2 x 4); the gradient is built in place. Measured on a CPU: bench/chunked_loss.py.
    """
    b = DTYPE_BYTES[p.dtype]
    if p.loss_chunks > 1:
        per_entry = (8 + (b if b < 4 else 0)) / p.loss_chunks
    else:
        per_entry = 12 + (b if p.keeps_logits else 0)
    return p.arch.vocab * per_entry + 4 * p.arch.hidden


def weight_bytes(p: PlanInputs) -> tuple[float, float, float]:
    """(packed 4-bit or 16-bit linear weights, their quantization constants, dense params) in bytes."""
    a, b = p.arch, DTYPE_BYTES[p.dtype]
    if p.quantized:
        packed = a.linear_params() * 4 / 8
        consts = a.linear_params() * (QUANT_BITS[p.double_quant] - 4) / 8
        return packed, consts, a.dense_params() * b
    return a.linear_params() * b, 0.0, a.dense_params() * b


def _weight_and_state_parts(p: PlanInputs) -> list[MemoryPart]:
    """Base, adapter, gradients and optimizer states, each divided the way its ZeRO stage divides it."""
    n, stage = p.num_gpus, p.zero_stage
    packed, consts, dense = weight_bytes(p)
    if stage == 3 and p.offload_params:
        base_gpu, base_host = consts, (packed + dense) / n
    elif stage == 3:
        # ZeRO-3 partitions parameters only: bitsandbytes' quant_state is not one, so it stays whole.
        base_gpu, base_host = (packed + dense) / n + consts, 0.0
    else:
        base_gpu, base_host = packed + consts + dense, 0.0
    kind = f"4-bit {p.quantization}{' +dq' if p.double_quant else ''}" if p.quantized else p.dtype
    kind += ", every weight trains" if p.method == "full" else ""
    parts = [MemoryPart("base weights", packed + consts + dense, base_gpu, base_host, kind)]
    trainable = p.adapter_params()
    w_full = trainable * p.trainable_bytes()
    if p.method == "lora":
        split = n if stage == 3 else 1
        on_host = stage == 3 and p.offload_params
        parts.append(MemoryPart("adapter weights", w_full, 0.0 if on_host else w_full / split,
                                w_full / n if on_host else 0.0, f"{trainable / 1e6:,.1f}M params"))
    parts.append(MemoryPart("gradients", w_full, w_full / (n if stage >= 2 else 1)))
    o_full, o_split = trainable * p.optimizer_bytes(), n if stage >= 1 else 1
    if p.offload_optimizer:
        parts.append(MemoryPart("optimizer states", o_full, 0.0, o_full / o_split, "AdamW on the CPU"))
    else:
        parts.append(MemoryPart("optimizer states", o_full, o_full / o_split, 0.0,
                                f"AdamW, {p.optimizer_bytes()} B/param"))
    return parts


def _activation_part(p: PlanInputs) -> tuple[MemoryPart, float]:
    """Activations at the step's peak (the loss, or one layer's backward) and the loss peak alone."""
    a, b, t = p.arch, DTYPE_BYTES[p.dtype], p.tokens_per_micro_batch
    layer = activation_bytes_per_token(p) * t
    work = backward_working_bytes_per_token(p) * t
    if p.quantized:
        work += max(x * y for x, y in a.linear_shapes().values()) * b  # one dequantized weight
    logits = logits_bytes_per_token(p) * t
    recomputed = p.checkpointed_layers()
    if recomputed:
        # A checkpointed layer keeps only its input; in backward it is rebuilt, one layer at a time.
        kept = recomputed * a.hidden * b * t + (a.layers - recomputed) * layer
        how = "checkpoints" if recomputed == a.layers else f"{recomputed} checkpoints + {a.layers - recomputed} layers"
        note = f"{how} {kept / GiB:.2f} + a layer {layer / GiB:.2f}; loss {logits / GiB:.2f}"
        peak = kept + max(logits, layer + work)
    else:
        kept = a.layers * layer
        note = f"{a.layers} layers x {layer / GiB:.2f}; loss {logits / GiB:.2f}"
        peak = kept + max(logits, work)
    return MemoryPart("activations", None, peak, note=note), logits


def _deepspeed_parts(p: PlanInputs) -> list[MemoryPart]:
    a, n, b = p.arch, p.num_gpus, DTYPE_BYTES[p.dtype]
    parts = []
    if p.zero_stage == 3 and n > 1:
        # Gathered parameters stay resident while their next use is near (max_reuse_distance), up to
        # stage3_max_live_parameters elements of the storage dtype; never less than a layer and its prefetch.
        packed, _, dense = weight_bytes(p)
        layer = a.layer_linear_params() * (QUANT_BITS[p.double_quant] / 8 if p.quantized else b)
        gathered = min(packed + dense, max(DS_MAX_LIVE_PARAMETERS * b, 2 * layer, a.vocab * a.hidden * b))
        parts.append(MemoryPart("ZeRO-3 gathered params", None, gathered, note="live + prefetched layers"))
    if p.zero_stage >= 1 and n > 1:
        bucket = min(DS_BUCKET_ELEMENTS, p.adapter_params()) * p.trainable_bytes()
        parts.append(MemoryPart("DeepSpeed buffers", None, bucket, note="gradient reduce bucket"))
    return parts


def plan_memory(p: PlanInputs) -> MemoryPlan:
    parts = _weight_and_state_parts(p)
    activations, logits = _activation_part(p)
    parts += [activations] + _deepspeed_parts(p)
    allocated = sum(x.per_gpu for x in parts)
    host = sum(x.host for x in parts)
    if p.cpu:
        overhead, frag = CPU_RUNTIME_BYTES, CPU_FRAGMENTATION
        parts.append(MemoryPart("Python runtime", None, overhead, note="torch, transformers, peft loaded"))
    else:
        overhead, frag = CUDA_CONTEXT_BYTES + (NCCL_BYTES if p.num_gpus > 1 else 0), FRAGMENTATION
        parts.append(MemoryPart("CUDA context + NCCL" if p.num_gpus > 1 else "CUDA context", None, overhead))
    parts.append(MemoryPart("allocator slack", None, allocated * (frag - 1), note=f"x{frag} of the tensors"))
    notes = []
    if logits > 0.25 * activations.per_gpu:
        notes.append(f"the loss over {p.arch.vocab:,} vocab entries peaks at {logits / GiB:.1f} GiB per micro batch; "
                     "a smaller micro batch shrinks it")
    if p.quantized and not p.cpu:
        notes.append("loading a 4-bit model leaves the bf16 load buffers in torch's cache (9 GiB for an 8B on "
                     "an H100); torch.cuda.empty_cache() after loading gives them back")
    return MemoryPlan(tuple(parts), allocated, overhead, allocated * frag + overhead, host, tuple(notes))
