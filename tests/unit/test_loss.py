"""lora/loss.py: the chunked linear + cross-entropy equals transformers' loss (value and gradients),
through a tiny Llama and through PEFT; activation checkpointing of every k-th layer is exact."""
from __future__ import annotations

import pytest
import torch

from lora.loss import IGNORE_INDEX, chunked_linear_cross_entropy, plain_linear_cross_entropy, training_loss


def tiny_llama(layers: int = 2, vocab: int = 97):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab, use_cache=False)
    return LlamaForCausalLM(cfg).float()


def batch_with_ignored(vocab: int = 97, batch: int = 2, seq: int = 13) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    labels = ids.clone()
    labels[0, :5] = IGNORE_INDEX      # a prompt that is not trained on
    labels[1, -3:] = IGNORE_INDEX     # padding at the end
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


@pytest.mark.parametrize("chunk", [3, 7, 26, 1000])  # 26 tokens: 3 and 7 do not divide them
def test_loss_and_gradients_equal_hf_on_a_tiny_llama(chunk):
    model = tiny_llama()
    batch = batch_with_ignored()
    ref = model(**batch).loss
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    got = training_loss(model, model, batch, "chunked", chunk)
    got.backward()
    assert got.item() == pytest.approx(ref.item(), abs=1e-5)
    for name, p in model.named_parameters():  # lm_head's weight included: it trains in this model
        torch.testing.assert_close(p.grad, ref_grads[name], atol=1e-6, rtol=1e-4, msg=name)


def test_hidden_and_weight_gradients_match_plain_and_frozen_head_gets_none():
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(3, 11, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g)
    labels = torch.randint(0, 50, (3, 11), generator=g)
    labels[2] = IGNORE_INDEX
    ref = plain_linear_cross_entropy(hidden, weight, labels)
    (ref_h,) = torch.autograd.grad(ref, hidden)
    got = chunked_linear_cross_entropy(hidden, weight, labels, chunk_tokens=4)
    (got_h,) = torch.autograd.grad(got, hidden)
    assert got.item() == pytest.approx(ref.item(), abs=1e-6)
    torch.testing.assert_close(got_h, ref_h, atol=1e-6, rtol=1e-5)
    assert weight.grad is None


def test_no_grad_and_all_ignored_behave_as_hf():
    hidden, weight = torch.randn(1, 6, 8), torch.randn(20, 8)
    labels = torch.randint(0, 20, (1, 6))
    with torch.no_grad():
        assert chunked_linear_cross_entropy(hidden, weight, labels, 4).item() == pytest.approx(
            plain_linear_cross_entropy(hidden, weight, labels).item(), abs=1e-6)
    ignored = torch.full_like(labels, IGNORE_INDEX)
    assert torch.isnan(chunked_linear_cross_entropy(hidden, weight, ignored, 4))
    assert torch.isnan(plain_linear_cross_entropy(hidden, weight, ignored))
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_linear_cross_entropy(hidden, weight, labels, 0)


def test_under_peft_the_adapter_gradients_match_and_the_head_computes_no_logits():
    from lora.adapter import apply_lora, build_lora_config

    base = tiny_llama()
    model = apply_lora(base, build_lora_config(base, r=4, alpha=8, dropout=0.0))
    for p in model.parameters():  # LoRA's B starts at zero: move it so every gradient is non-trivial
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    batch = batch_with_ignored()
    ref = model(**batch).loss
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)

    shapes = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, a, out: shapes.append(tuple(out.shape)))
    got = training_loss(model, model, batch, "chunked", 8)
    handle.remove()
    got.backward()
    assert shapes == [(2, 0, 97)]  # the head saw an empty slice: no [B, T, vocab] logits were made
    assert got.item() == pytest.approx(ref.item(), abs=1e-5)
    for name, g in ref_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, g, atol=1e-6, rtol=1e-4, msg=name)


def test_plain_kind_is_the_models_own_loss():
    model = tiny_llama()
    batch = batch_with_ignored()
    assert training_loss(model, model, batch, "plain").item() == model(**batch).loss.item()


def test_fused_falls_back_to_chunks_on_cpu():
    model = tiny_llama()
    batch = batch_with_ignored()
    assert training_loss(model, model, batch, "fused", 8).item() == pytest.approx(model(**batch).loss.item(), abs=1e-5)


def losses_with_checkpointing(every: int | None, steps: int = 3) -> list[float]:
    from lora.adapter import apply_lora, build_lora_config

    base = tiny_llama(layers=4)
    model = apply_lora(base, build_lora_config(base, r=4, alpha=8, dropout=0.0),
                       gradient_checkpointing=every is not None, checkpoint_every=every or 1)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    batch, out = batch_with_ignored(), []
    for _ in range(steps):
        loss = training_loss(model, model, batch, "chunked", 8)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append(loss.item())
    return out


def test_every_second_layer_checkpointed_trains_exactly_as_without():
    plain = losses_with_checkpointing(None)
    assert plain[-1] < plain[0]  # it trains
    assert losses_with_checkpointing(2) == pytest.approx(plain, abs=1e-6)
    assert losses_with_checkpointing(1) == pytest.approx(plain, abs=1e-6)


def test_every_k_checkpoints_the_layers_at_multiples_of_k():
    from lora.adapter import apply_lora, build_lora_config

    base = tiny_llama(layers=5)
    model = apply_lora(base, build_lora_config(base, r=4, alpha=8), gradient_checkpointing=True, checkpoint_every=2)
    flags = [layer.gradient_checkpointing for layer in model.get_base_model().model.layers]
    assert flags == [True, False, True, False, True]
