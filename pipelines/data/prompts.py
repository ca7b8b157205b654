"""Prompt rendering shared by training (label masks) and evaluation (generation)."""
from __future__ import annotations

ALPACA_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ALPACA_TEMPLATE_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"


def alpaca_prompt(instruction: str, input: str = "") -> str:
    if input:
        return ALPACA_TEMPLATE.format(instruction=instruction, input=input)
    return ALPACA_TEMPLATE_NO_INPUT.format(instruction=instruction)


# -- inference: the prompt a model saw in training, for a request that did not come from a file --
def template_for(data_format: str) -> str:
    """How a model trained on `data.format` expects its prompts: "alpaca" (the template above),
    "chat" (the tokenizer's chat template; chat and sharegpt data) or "text" (plain continuation)."""
    if data_format == "alpaca":
        return "alpaca"
    if data_format in ("chat", "sharegpt"):
        return "chat"
    return "text"


def completion_prompt(template: str, tokenizer, prompt: str, input: str = "") -> str:
    """A single instruction (plus optional input) as the model's training prompt."""
    if template == "alpaca":
        return alpaca_prompt(prompt, input)
    if template == "chat":
        content = f"{prompt}\n\n{input}" if input else prompt
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt + (f"\n{input}" if input else "")


def chat_prompt(template: str, tokenizer, messages: list[dict]) -> str:
    """An OpenAI-style message list as the model's training prompt. An alpaca-trained model sees
    the last user message as its instruction (earlier turns and a system message become the
    instruction's context); a chat-trained one gets the tokenizer's chat template."""
    if template == "chat":
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    users = [m["content"] for m in messages if m.get("role") == "user"]
    if not users:
        raise ValueError("messages need at least one user message")
    last_user = max(i for i, m in enumerate(messages) if m.get("role") == "user")
    context = [m["content"] for m in messages[:last_user]]
    if template == "alpaca":
        return alpaca_prompt(users[-1], "\n".join(context))
    return "\n".join([*context, users[-1]])
