"""Loading the frozen base: full precision or 4-bit (QLoRA). QLoRA is decided here and only here."""
from __future__ import annotations

import hashlib
import importlib.util
import logging
from pathlib import Path
from typing import Optional

import torch

from lora.errors import LoraInputError

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class _NoOptionalKernelNotice(logging.Filter):
    """bitsandbytes' CPU backend tries the optional `kernels` package (which fetches a kernel from
    a hub) and, without it, warns and uses its own kernel. Nothing for a user to act on here: the
    fallback is what runs, and fetching from a hub is not how lorapipe loads code."""

    def filter(self, record: logging.LogRecord) -> bool:
        absent = bool(record.args) and isinstance(record.args[0], ModuleNotFoundError)
        return not (str(record.msg).startswith("Failed to load CPU gemm_4bit_forward") and absent)


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoOptionalKernelNotice())


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _check_source(path: str) -> None:
    """A local-looking path must exist; anything else is treated as a hub id."""
    looks_local = path.startswith((".", "/", "~")) or Path(path).exists() or path.count("/") > 1
    if looks_local and not Path(path).expanduser().exists():
        raise LoraInputError(f"model path not found: {path}")


def build_bnb_config(dtype: str, quantization: str, double_quant: bool, quant_storage: Optional[str]):
    if importlib.util.find_spec("bitsandbytes") is None:
        raise LoraInputError(
            f"model.quantization={quantization} needs bitsandbytes, which is not installed; "
            "pip install bitsandbytes or set model.quantization=none")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch_dtype(dtype),
        # ZeRO-3 partitions parameters by dtype: packed 4-bit storage must match the load dtype.
        bnb_4bit_quant_storage=torch_dtype(quant_storage) if quant_storage else torch.uint8,
    )


def load_base_model(
    path: str,
    *,
    dtype: str = "bf16",
    quantization: str = "none",
    double_quant: bool = True,
    quant_storage: Optional[str] = None,
    device: str = "cpu",
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
    revision: Optional[str] = None,
):
    """The frozen base model, every parameter requires_grad=False."""
    from transformers import AutoModelForCausalLM

    _check_source(path)
    kwargs = dict(
        dtype=torch_dtype(dtype),
        attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code,
        revision=revision,
        use_safetensors=True,  # never unpickle weights
    )
    if quantization != "none":
        kwargs["quantization_config"] = build_bnb_config(dtype, quantization, double_quant, quant_storage)
        kwargs["device_map"] = {"": device}
        if device == "cpu":
            map_large_blocks_directly()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise LoraInputError(f"cannot load model {path!r}: {_first_line(e)}") from None
    if quantization == "none":
        model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    if device == "cpu":
        if quantization != "none":
            keep_4bit_weights_unpacked(model)
        release_freed_heap()
    return model


def keep_4bit_weights_unpacked(model) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks a Linear4bit's weight in place, in a CPU-only
    layout, the first time it runs in eval mode without grad. Merging (dequantize) and DeepSpeed's
    checkpoint save then read that layout as NF4 and fail or go wrong (merge parity off by ~2 in
    the logits; "packed_weight should be [N, K/2]"). Keep the standard layout everywhere."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _glibc():
    """The C library when it is glibc (its malloc tunables), else None (macOS, musl)."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


def release_freed_heap() -> None:
    """Hand the heap pages that loading freed (16-bit copies quantized away, load buffers) back to
    the OS. glibc keeps such fragments in its arenas, where the large activation and gradient
    blocks of training cannot reuse them, so on CPU they stay resident for the whole run."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
LARGE_BLOCK_BYTES = 2 << 20


def map_large_blocks_directly() -> None:
    """QLoRA on CPU: blocks of 2 MiB and more (layer activations, the weights bitsandbytes
    dequantizes for each matmul) are mapped from the OS and returned on free. By default glibc
    raises this threshold as such blocks are freed and serves them from its heap, which they then
    fragment, so the peak grows step after step (bench/qlora_memory.py: 1.25 x the computed floor
    with this, 1.51 x and growing without; bench/results/qlora_memory.json), against slower steps
    from the page faults of fresh mappings. QLoRA is the memory-first choice,
    so this is its default on CPU; an explicit MALLOC_MMAP_THRESHOLD_ in the environment wins."""
    import os

    libc = _glibc()
    if libc is not None and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        libc.mallopt(_M_MMAP_THRESHOLD, LARGE_BLOCK_BYTES)


def load_tokenizer(path: str, trust_remote_code: bool = False, revision: Optional[str] = None):
    from transformers import AutoTokenizer

    _check_source(path)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError) as e:
        raise LoraInputError(f"cannot load tokenizer {path!r}: {_first_line(e)}") from None
    if tok.pad_token is None:
        # Padding positions are masked out of the loss, so reusing EOS is safe.
        tok.pad_token = tok.eos_token
    return tok


def model_content_hash(path: str) -> Optional[str]:
    """SHA-256 over a local model's weight and config files (sorted), or None for a hub id."""
    root = Path(path).expanduser()
    if not root.is_dir():
        return None
    h = hashlib.sha256()
    for f in sorted(root.glob("*")):
        if f.suffix in {".safetensors", ".json"} and f.is_file():
            h.update(f.name.encode())
            with f.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()
