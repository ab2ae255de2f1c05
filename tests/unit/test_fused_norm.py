"""The fused RMSNorm (deltaw.train.fused_norm): Llama's RMSNorm forward bit for bit, and its gradients within
one bf16 rounding, on a tiny random Llama; Gemma-style norms are left alone."""

from __future__ import annotations

import copy

import pytest
import torch

import deltaw
from deltaw.train.fused_norm import fuse_norms
from tests.conftest import make_tiny_llama


def run(model: torch.nn.Module, autocast: bool) -> tuple[torch.Tensor, dict]:
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=tokens).logits.float()
    logits.square().mean().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dtype, autocast", [(torch.float32, False), (torch.bfloat16, True)])
def test_fused_norms_match_the_model_own(dtype, autocast):
    model = make_tiny_llama(dtype=dtype).train()
    deltaw.add_lora(model, deltaw.LoRAConfig(rank=4), dtype=torch.float32)
    for name, parameter in model.named_parameters():
        if "norm" in name:
            parameter.requires_grad_(True)  # the norm weights' gradient is checked too
    reference = copy.deepcopy(model)
    assert fuse_norms(model) == 2 * 2 + 1  # two per block and the final norm
    ref_logits, ref_grads = run(reference, autocast)
    logits, grads = run(model, autocast)
    assert torch.equal(logits, ref_logits)
    tolerance = 1e-5 if dtype == torch.float32 else 2 ** -6
    for name, grad in grads.items():
        assert (grad - ref_grads[name]).norm() <= tolerance * ref_grads[name].norm() + 1e-12, name
    assert state_keys(model) == state_keys(reference) and fuse_norms(model) == 0  # once only


def state_keys(model: torch.nn.Module) -> list[str]:
    return list(model.state_dict())


def test_other_norms_are_left_alone():
    norm = torch.nn.RMSNorm(8)
    assert fuse_norms(torch.nn.Sequential(norm)) == 0 and "forward" not in vars(norm)
