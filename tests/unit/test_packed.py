"""The bf16 base weight prepacked for oneDNN (deltaw.quant.packed) gives F.linear's exact results, whatever the
row count, and a routed layer packs its weight again when the weight changes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deltaw.adapters.lora.routed import RoutedLinear, Routing
from deltaw.quant.packed import linear_packed, pack, packable
from deltaw.serve.bank import AdapterBank
from tests.conftest import make_tiny_llama
from tests.unit.test_bank import ALL, ATTENTION, CHOICES, routed_logits, write_random_adapter

needs_bf16_onednn = pytest.mark.skipif(
    not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
    reason="this CPU's oneDNN has no bf16 kernels: packing does not apply (F.linear runs instead)")


@needs_bf16_onednn
@pytest.mark.parametrize("rows", [1, 3, 16, 40])
def test_a_packed_linear_equals_f_linear_bit_for_bit(rows):
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 64, generator=generator).bfloat16()
    bias = torch.randn(96, generator=generator).bfloat16()
    x = torch.randn(rows, 2, 64, generator=generator).bfloat16()
    with torch.inference_mode():
        assert packable(weight, x)
        assert torch.equal(linear_packed(x, pack(weight), bias), F.linear(x, weight, bias))


def test_packing_applies_to_bf16_inference_only(monkeypatch):
    weight, x = torch.zeros(4, 4, dtype=torch.bfloat16), torch.zeros(1, 4, dtype=torch.bfloat16)
    assert not packable(weight.float(), x.float())
    with torch.enable_grad():
        assert not packable(weight, x)  # training reads the weight itself
    with torch.inference_mode():
        monkeypatch.setenv("DELTAW_PACKED_LINEAR", "0")
        assert not packable(weight, x)


@needs_bf16_onednn
def test_a_routed_layer_serves_from_the_packed_weight_and_repacks_a_changed_one():
    layer = RoutedLinear(nn.Linear(64, 32).bfloat16(), Routing())
    x = torch.randn(5, 1, 64).bfloat16()
    with torch.inference_mode():
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
        packed = layer._packed
        assert packed is not None
        layer(x)
        assert layer._packed is packed  # packed once
        layer.weight.add_(1.0)
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
        assert layer._packed is not packed


@needs_bf16_onednn
@pytest.mark.parametrize("batch", ["one adapter", "several"])
def test_a_bf16_bank_computes_its_deltas_from_packed_factors_like_the_reference(tmp_path, batch):
    model = make_tiny_llama()
    adapters = {name: write_random_adapter(tmp_path / name, model, targets, rank=rank, seed=seed)
                for seed, (name, targets, rank) in enumerate([("attn", ATTENTION, 2), ("full", ALL, 8),
                                                              ("mlp", ["down_proj", "up_proj"], 4)])}
    bank = AdapterBank(make_tiny_llama(dtype=torch.bfloat16))
    for name, path in adapters.items():
        bank.load(name, path)
    choices = CHOICES[batch]
    tokens = torch.randint(0, 128, (len(choices), 9), generator=torch.Generator().manual_seed(0))
    fast = routed_logits(bank, tokens, choices).float()
    factors = bank.stores["lora"].layers["model.layers.0.mlp.down_proj"]._factors.values()
    assert any(f is not None and f._packed is not None for f in factors)  # the packed path ran
    reference = routed_logits(bank, tokens, choices, reference=True).float()
    assert (fast - reference).abs().max() <= 0.05 * reference.abs().max()  # bf16 rounding, not a wrong delta
