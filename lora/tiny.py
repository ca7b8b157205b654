"""A tiny Llama built from a config and a word-level tokenizer trained locally: a base model with no hub."""
from __future__ import annotations

from typing import Iterable

# A minimal chat template so the chat data format works with the tiny tokenizer too.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% if m['role'] == 'assistant' %}"
    "{{ eos_token }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]


def train_word_tokenizer(texts: Iterable[str]):
    """A word-level tokenizer trained on `texts`: every whitespace-separated word and every
    punctuation mark seen becomes one token. Short sequences keep a tiny model fast on a CPU;
    words outside the corpus map to <unk>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS, min_frequency=1))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_llama(vocab_size: int, *, hidden: int = 128, layers: int = 4, heads: int = 4,
                     intermediate: int | None = None, max_positions: int = 512, seed: int = 0,
                     pad_token_id: int = 0, bos_token_id: int = 1, eos_token_id: int = 2):
    """A randomly initialised LlamaForCausalLM of a few million parameters (fp32)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate or hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)
