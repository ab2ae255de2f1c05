"""The fused LoRA training path (deltaw.adapters.lora.fused: one autograd node per group of layers sharing
their input, one GEMM for their A's) computes what the layer-by-layer path computes: the same outputs and
the same gradients for the adapter weights, in fp32 and under bf16 autocast, for LoRA and QLoRA."""

from __future__ import annotations

import copy

import pytest
import torch

import deltaw
from deltaw.adapters.lora import fused, lora_layers
from deltaw.models.quantized import quantize_model
from tests.conftest import make_tiny_llama, randomize_lora_b


def adapted(dtype: torch.dtype, quantized: bool = False) -> torch.nn.Module:
    """A tiny Llama with r=4 LoRA on every linear layer (B random, so that every term counts)."""
    model = make_tiny_llama(dtype=dtype)
    if quantized:
        quantize_model(model)
    deltaw.add_lora(model, deltaw.LoRAConfig(rank=4, alpha=8), dtype=torch.float32)
    randomize_lora_b(model, "default")
    return model.train()


def loss_and_grads(model: torch.nn.Module, enabled: bool, monkeypatch, autocast: bool) -> tuple[torch.Tensor, dict]:
    """The logits and every trainable gradient of a sum-of-squares loss, fused path on or off."""
    monkeypatch.setattr(fused, "ENABLED", enabled)
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=tokens).logits.float()
    logits.square().mean().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_groups_are_the_layers_that_share_their_input():
    model = adapted(torch.float32)
    groups = {name.rsplit(".", 1)[1]: layer.shared_input for name, layer in lora_layers(model)}
    layers = dict(lora_layers(model))
    attention = layers["model.layers.0.self_attn.q_proj"].shared_input
    assert attention.members == [layers[f"model.layers.0.self_attn.{n}_proj"] for n in "qkv"]
    assert layers["model.layers.0.mlp.up_proj"].shared_input.members == [
        layers["model.layers.0.mlp.gate_proj"], layers["model.layers.0.mlp.up_proj"]]
    assert groups["o_proj"] is None and groups["down_proj"] is None


@pytest.mark.parametrize("quantized", [False, True])
def test_fused_path_equals_the_layer_by_layer_path_in_fp32(monkeypatch, quantized):
    model = adapted(torch.float32, quantized)
    ref_logits, ref_grads = loss_and_grads(copy.deepcopy(model), False, monkeypatch, autocast=False)
    logits, grads = loss_and_grads(model, True, monkeypatch, autocast=False)
    assert len(grads) == 2 * 7 * 2 and grads.keys() == ref_grads.keys()
    assert (logits - ref_logits).abs().max() <= 1e-5 * ref_logits.abs().max()
    for name, grad in grads.items():
        assert (grad - ref_grads[name]).abs().max() <= 1e-5 * ref_grads[name].abs().max(), name


@pytest.mark.parametrize("quantized", [False, True])
def test_fused_path_is_as_close_to_fp32_as_the_layer_by_layer_path_in_bf16(monkeypatch, quantized):
    """Under bf16 autocast both paths round differently (the fused one sums dX inside its GEMMs instead of
    rounding each layer's term and adding), so each is compared with the fp32 computation: the fused path's
    error may not exceed the layer-by-layer path's by more than a factor of 2."""
    model = adapted(torch.bfloat16 if not quantized else torch.float32, quantized)
    truth_logits, truth = loss_and_grads(copy.deepcopy(model).float(), False, monkeypatch, autocast=False)
    plain_logits, plain = loss_and_grads(copy.deepcopy(model), False, monkeypatch, autocast=True)
    logits, grads = loss_and_grads(model, True, monkeypatch, autocast=True)
    assert (logits - truth_logits).abs().max() <= 2 * (plain_logits - truth_logits).abs().max() + 1e-6
    for name, grad in grads.items():
        assert grad.dtype == torch.float32
        error, plain_error = (grad - truth[name]).norm(), (plain[name] - truth[name]).norm()
        assert error <= 2 * plain_error + 1e-3 * truth[name].norm(), name


def test_fused_path_is_used_in_training_only(monkeypatch):
    model = adapted(torch.float32)
    calls = []
    real = fused.SharedInputLoRA.apply
    monkeypatch.setattr(fused.SharedInputLoRA, "apply", lambda *a: calls.append(len(a[1])) or real(*a))
    tokens = torch.randint(0, 128, (1, 5))
    with torch.no_grad():
        model(input_ids=tokens)
    assert calls == []
    model(input_ids=tokens).logits.sum().backward()
    assert calls == [3, 1, 2, 1] * 2  # q/k/v, o, gate/up, down in each of the two blocks


def test_a_trained_base_weight_keeps_the_layer_by_layer_path():
    model = adapted(torch.float32)
    layer = dict(lora_layers(model))["model.layers.1.self_attn.k_proj"]
    layer.weight.requires_grad_(True)
    model(input_ids=torch.randint(0, 128, (1, 5))).logits.sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
