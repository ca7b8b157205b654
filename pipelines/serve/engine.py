"""The model side of serving: one base in memory, adapters loaded under internal names, and
greedy generation for a batch whose rows each name their own adapter (PEFT's mixed-adapter
batches: every LoRA layer applies each adapter to its own rows only).

No Ray here: the Serve deployment (app.py) owns one of these and calls it from one thread at a time.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from transformers.generation.streamers import BaseStreamer

from pipelines.artifacts.resolve import ResolvedModel, load_base_for_inference

BASE_ROW = "__base__"  # PEFT's adapter name for "the base alone" in a mixed batch


class StepStreamer(BaseStreamer):
    """Hands generate()'s new tokens to `on_step`, one decoding step at a time (one id per row)."""

    def __init__(self, on_step: Callable[[list[int]], None]):
        self.on_step = on_step
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt itself
            self.prompt_seen = True
            return
        self.on_step(value.reshape(-1).tolist())

    def end(self) -> None:
        pass


@dataclass
class RowText:
    """One row's answer as it grows: text deltas from its tokens; done at EOS or its own budget.
    Decoding the whole answer each step (not token by token) keeps multi-byte pieces intact."""

    tokenizer: object
    max_tokens: int
    ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: Optional[str] = None

    def add(self, token_id: int) -> str:
        if self.finish_reason:
            return ""
        if token_id == self.tokenizer.eos_token_id:
            self.finish_reason = "stop"
            return ""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        delta, self.text = text[len(self.text):], text
        if len(self.ids) >= self.max_tokens:
            self.finish_reason = "length"
        return delta


class MultiAdapterModel:
    """A base with any number of LoRA adapters, each under an internal name, or a merged model."""

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"  # generation continues from the right edge

    @classmethod
    def load(cls, first: ResolvedModel, device: str = "cpu") -> "MultiAdapterModel":
        """The base as its adapters were trained on it (or the merged model); adapters come next."""
        model, tokenizer = load_base_for_inference(first, device)
        return cls(model, tokenizer)

    @property
    def has_adapters(self) -> bool:
        return hasattr(self.model, "peft_config")

    @property
    def context_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    def add_adapter(self, internal_name: str, adapter_dir) -> None:
        from peft import PeftModel

        if self.has_adapters:
            self.model.load_adapter(str(adapter_dir), adapter_name=internal_name)
        else:
            self.model = PeftModel.from_pretrained(self.model, str(adapter_dir), adapter_name=internal_name)
        self.model.eval()

    def delete_adapter(self, internal_name: str) -> None:
        self.model.delete_adapter(internal_name)

    def count_tokens(self, prompt: str) -> int:
        return len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])

    def encode(self, prompts: list[str]) -> dict:
        """The batch's prompts, left-padded. Call it from the thread that decodes answers: a fast
        tokenizer used from two threads at once fails ("Already borrowed")."""
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        return {k: v.to(self.model.device) for k, v in enc.items()}

    @torch.no_grad()
    def generate(self, encoded: dict, adapters: list[str], max_new_tokens: int,
                 on_step: Callable[[list[int]], None]) -> None:
        """Greedy decoding of the whole batch at once; row i uses adapter adapters[i] (BASE_ROW: none)."""
        per_row = {"adapter_names": adapters} if self.has_adapters else {}
        self.model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False, streamer=StepStreamer(on_step),
                            eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
                            **per_row)
