"""deltaw's eager attention (deltaw.attention) computes transformers' eager attention: same outputs, same
gradients (within one bf16 rounding), on tiny random models with grouped-query attention, with padding,
and with prefixes in front of the keys."""

from __future__ import annotations

import copy

import pytest
import torch

import deltaw
from deltaw import compat
from deltaw.attention import EAGER
from deltaw.train.loop import choose_attention
from tests.conftest import make_tiny_llama


def forward_backward(model: torch.nn.Module, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """(logits, every trainable parameter's gradient) of a sum-of-squares loss, under bf16 autocast."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=tokens, attention_mask=mask).logits.float()
    logits.square().mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def both(model: torch.nn.Module, tokens: torch.Tensor, mask: torch.Tensor) -> list[tuple[torch.Tensor, dict]]:
    """forward_backward of `model` with transformers' eager attention, then with deltaw's; the attention
    each ran is in `ran`."""
    results = []
    ran.clear()
    for implementation in ("eager", EAGER):
        copied = copy.deepcopy(model).train()
        copied.set_attn_implementation(implementation)
        results.append(forward_backward(copied, tokens, mask))
        ran.append(compat.attention_implementation(copied))
    return results


ran: list[str] = []


@pytest.mark.parametrize("padded", [False, True])
def test_matches_transformers_eager_with_grouped_query_attention(padded):
    model = make_tiny_llama(dtype=torch.bfloat16)
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(tokens)
    if padded:
        mask[1, :4] = 0
    (ref_logits, ref_grads), (logits, grads) = both(model, tokens, mask)
    assert torch.equal(logits, ref_logits)  # the forward is exact: scaling 1/4 is a power of two
    for name, grad in grads.items():
        scale = ref_grads[name].abs().max().item()
        assert (grad - ref_grads[name]).abs().max().item() <= 2 ** -6 * scale + 1e-6, name


def test_prefix_tuning_runs_on_it():
    model = make_tiny_llama(dtype=torch.bfloat16)
    deltaw.add_prefix(model, deltaw.PrefixConfig(num_virtual_tokens=3))
    tokens = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(tokens)
    mask[0, :2] = 0
    (ref_logits, ref_grads), (logits, grads) = both(model, tokens, mask)
    assert ran == ["deltaw_prefix_eager", "deltaw_prefix_deltaw_eager"]
    assert len(grads) == 1 and torch.equal(logits, ref_logits)
    for name, grad in grads.items():
        assert (grad - ref_grads[name]).abs().max().item() <= 2 ** -6 * ref_grads[name].abs().max().item(), name


def test_training_chooses_it_for_bf16_on_cpu():
    model = make_tiny_llama()
    assert choose_attention(model, 256, "bf16") == EAGER == compat.attention_implementation(model)
    assert choose_attention(make_tiny_llama(), 1024, "bf16") == "sdpa"
