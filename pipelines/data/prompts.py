"""Prompt rendering shared by training (label masks) and evaluation (generation)."""
from __future__ import annotations

ALPACA_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ALPACA_TEMPLATE_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"


def alpaca_prompt(instruction: str, input: str = "") -> str:
    if input:
        return ALPACA_TEMPLATE.format(instruction=instruction, input=input)
    return ALPACA_TEMPLATE_NO_INPUT.format(instruction=instruction)
