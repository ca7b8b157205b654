"""The causal-LM loss without the full logits: linear + cross-entropy a chunk of tokens at a time.

Hugging Face's loss materialises logits for every token ([N, vocab] in the model dtype, then an
fp32 copy, the log-softmax and its gradient): at a 128k vocabulary that is the largest tensor of
a LoRA step. `chunked_linear_cross_entropy` computes the same loss (same causal shift, same
IGNORE_INDEX, mean over the counted tokens) from the final hidden states and the output head's
weight, holding the logits of one chunk of tokens at a time. Like Liger's fused kernel, each
chunk's gradient w.r.t. the hidden states (and the head's weight, only when it trains) is built
in the forward, while the chunk's logits exist anyway; backward only scales it, so there is no
recompute and no extra matmul over the plain loss.

`training_loss` runs a model (a PEFT model, or the DeepSpeed engine around one) without labels,
takes the head's input through a forward pre-hook that hands the head an empty slice (so it
computes no logits), and applies the chosen loss. On CUDA, loss="fused" uses Liger's fused linear
cross-entropy or Apple's cut-cross-entropy when installed (the `gpu` extra), else the chunked one.
"""
from __future__ import annotations

import contextlib
import importlib.util
from typing import Callable, Literal, Optional

import torch
from torch import nn

IGNORE_INDEX = -100  # transformers' ignore_index, and pipelines.data.prepare's
LossKind = Literal["plain", "chunked", "fused", "liger", "cce"]  # liger/cce: that kernel, no fallback


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Targets of each position as transformers builds them: the next label, IGNORE_INDEX last."""
    return nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Sum of token losses and its gradients, one chunk of tokens' logits at a time."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, weight_grad: bool):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden, dtype=torch.float32)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if weight_grad else None
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start:start + chunk], targets[start:start + chunk]
            keep = t != IGNORE_INDEX
            if not bool(keep.any()):
                continue
            logits = (h @ weight.t()).float()  # the model dtype's matmul, upcast as HF's loss does
            lse = torch.logsumexp(logits, dim=-1)
            safe = t.clamp(min=0)
            total += (lse - logits.gather(1, safe[:, None]).squeeze(1))[keep].sum()
            # d(sum of losses)/d(logits) = softmax - onehot on counted rows, 0 elsewhere (in place: one buffer).
            grad = logits.sub_(lse[:, None]).exp_()
            grad[torch.arange(len(t), device=t.device), safe] -= 1.0
            grad.mul_(keep[:, None])
            grad = grad.to(hidden.dtype)
            grad_hidden[start:start + chunk] = grad @ weight
            if grad_weight is not None:
                grad_weight += (grad.t() @ h).float()
            del logits, grad
        ctx.save_for_backward(grad_hidden, grad_weight if grad_weight is not None else torch.empty(0))
        ctx.weight_grad = weight_grad
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = (grad_hidden * grad_total).to(ctx.dtypes[0])
        gw = (grad_weight * grad_total).to(ctx.dtypes[1]) if ctx.weight_grad else None
        return gh, gw, None, None, None


def _sum_loss_no_grad(hidden, weight, targets, chunk: int) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk):
        logits = (hidden[start:start + chunk] @ weight.t()).float()
        total += nn.functional.cross_entropy(logits, targets[start:start + chunk], ignore_index=IGNORE_INDEX,
                                             reduction="sum")
    return total


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                 chunk_tokens: int = 1024) -> torch.Tensor:
    """Mean next-token cross-entropy of `hidden` [B, T, H] through `weight` [V, H], as transformers'
    ForCausalLMLoss computes it from `labels` [B, T] (shifted here; IGNORE_INDEX not counted)."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    targets = shift_labels(labels).reshape(-1).to(hidden.device)
    flat = hidden.reshape(-1, hidden.shape[-1])
    counted = (targets != IGNORE_INDEX).sum().float()  # 0 -> nan, as HF's mean over no tokens
    if not torch.is_grad_enabled() or not (flat.requires_grad or weight.requires_grad):
        return _sum_loss_no_grad(flat, weight, targets, chunk_tokens) / counted
    total = _ChunkedLinearCrossEntropy.apply(flat, weight, targets, chunk_tokens, weight.requires_grad)
    return total / counted


def plain_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The reference: full logits, then transformers' own causal-LM loss."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    return ForCausalLMLoss(hidden @ weight.t(), labels, vocab_size=weight.shape[0])


# -- fused kernels (CUDA, optional packages) ----------------------------------------------------
def fused_backend(device: torch.device) -> Optional[str]:
    """'liger' or 'cce' when one is installed and the device is CUDA, else None (the torch chunks)."""
    if device.type != "cuda":
        return None
    for name, module in (("liger", "liger_kernel"), ("cce", "cut_cross_entropy")):
        if importlib.util.find_spec(module) is not None:
            return name
    return None


def fused_linear_cross_entropy(hidden, weight, labels, backend: str) -> torch.Tensor:
    targets = shift_labels(labels).reshape(-1)
    flat = hidden.reshape(-1, hidden.shape[-1])
    if backend == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="mean")(weight, flat, targets)
    from cut_cross_entropy import linear_cross_entropy

    return linear_cross_entropy(flat, weight, targets, ignore_index=IGNORE_INDEX, reduction="mean")


def linear_cross_entropy(hidden, weight, labels, kind: LossKind, chunk_tokens: int) -> torch.Tensor:
    if kind in ("liger", "cce"):
        return fused_linear_cross_entropy(hidden, weight, labels, kind)
    if kind == "fused" and (backend := fused_backend(hidden.device)) is not None:
        return fused_linear_cross_entropy(hidden, weight, labels, backend)
    if kind == "plain":
        return plain_linear_cross_entropy(hidden, weight, labels)
    return chunked_linear_cross_entropy(hidden, weight, labels, chunk_tokens)


# -- running a (PEFT / DeepSpeed-wrapped) causal LM for its final hidden states -----------------
def output_head(model: nn.Module) -> nn.Module:
    """The output projection of a causal LM; PEFT's wrappers forward the call to the base model."""
    return model.get_output_embeddings()


def head_weight(head: nn.Module) -> Optional[torch.Tensor]:
    """The head's weight when it is a plain bias-free linear; None for a LoRA-wrapped or biased head."""
    if type(head) is nn.Linear and head.bias is None:
        return head.weight
    return None


@contextlib.contextmanager
def head_input_captured(head: nn.Module):
    """Within: the head's input is stored in the yielded dict and the head gets an empty slice of it."""
    seen: dict = {}

    def take(_module, args):
        seen["hidden"] = args[0]
        return (args[0][..., :0, :],) + tuple(args[1:])

    handle = head.register_forward_pre_hook(take)
    try:
        yield seen
    finally:
        handle.remove()


def training_loss(forward: Callable, model: nn.Module, batch: dict, kind: LossKind = "chunked",
                  chunk_tokens: int = 1024) -> torch.Tensor:
    """The loss of `batch` (input_ids, labels, ...) under `forward`: the DeepSpeed engine (whose
    module is `model`), or the model itself. Going through the engine keeps its forward hooks.

    kind="plain", or a head that is not a plain linear (LoRA on lm_head), runs the model with its
    labels: transformers' loss over the full logits.
    """
    head = output_head(model)
    weight = head_weight(head)
    if kind == "plain" or weight is None:
        return forward(**batch).loss
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with head_input_captured(head) as seen:
        forward(**inputs)
    return linear_cross_entropy(seen["hidden"], weight, batch["labels"], kind, chunk_tokens)
