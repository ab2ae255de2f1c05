"""Routed layers that read the same input (q/k/v, gate/up) served as one group: each member gets the output it
computes alone, the group computes once per input, and every case the group cannot serve runs the members alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deltaw.adapters.lora.routed import RoutedLinear, Routing
from deltaw.adapters.lora.routed_group import SiblingGroup
from deltaw.serve.bank import AdapterBank
from tests.conftest import make_tiny_llama
from tests.unit.test_packed import needs_bf16_onednn

ROUTES = {
    "base": [(), ()],
    "one adapter": [((0, 1.0),), ((0, -0.5),), ()],
    "mixed": [((0, 1.0),), ((1, 1.0),), ((0, 0.5), (2, 0.5)), (), ((2, 1.0),)],
}


def make_members(bias: bool, dtype: torch.dtype = torch.bfloat16, gain: bool = False) -> list[RoutedLinear]:
    """Three routed layers reading 32 features (outputs 48, 16, 16) over one routing, with slots 0 and 2 in every
    member and slot 1 only in the first and last (a member some adapter skips)."""
    torch.manual_seed(0)
    routing = Routing()
    members = [RoutedLinear(nn.Linear(32, out, bias=bias).to(dtype), routing) for out in (48, 16, 16)]
    for index, member in enumerate(members):
        for slot, rank, scaling in ((0, 4, 2.0), (1, 2, 0.75), (2, 3, 1.5)):
            if slot == 1 and index == 1:
                member.reserve(3, 0)
                member.clear_slot(1)
                continue
            extra = {"gain": 1 + 0.1 * torch.randn(member.out_features)} if gain and slot == 0 else {}
            member.write_slot(slot, torch.randn(rank, 32).to(dtype), torch.randn(member.out_features, rank).to(dtype),
                              scaling, **extra)
    return members


def outputs(members: list[RoutedLinear], x: torch.Tensor, group: SiblingGroup | None) -> list[torch.Tensor]:
    for member in members:
        member.group = group
    with torch.inference_mode():
        return [member(x) for member in members]


@needs_bf16_onednn
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("routes", list(ROUTES))
@pytest.mark.parametrize("seq", [3, 40])  # decode-sized (thin products prepacked) and prefill-sized (addmm_)
def test_each_member_gets_its_own_output_from_one_computation(bias, routes, seq, monkeypatch):
    members = make_members(bias)
    members[0].routing.set(ROUTES[routes])
    x = torch.randn(len(ROUTES[routes]), seq, 32).bfloat16()
    alone = outputs(members, x, None)
    group = SiblingGroup(members)
    computed = []
    compute = group._compute
    monkeypatch.setattr(group, "_compute", lambda x: computed.append(x) or compute(x))
    together = outputs(members, x, group)
    assert len(computed) == 1  # the first member computed all three
    for own, grouped in zip(alone, together):
        assert grouped.shape == own.shape
        assert torch.equal(grouped, own)


@needs_bf16_onednn
def test_a_member_called_with_another_input_runs_alone():
    members = make_members(bias=False)
    members[0].routing.set(ROUTES["mixed"])
    first, second = torch.randn(5, 2, 32).bfloat16(), torch.randn(5, 2, 32).bfloat16()
    alone = outputs(members, second, None)
    group = SiblingGroup(members)
    for member in members:
        member.group = group
    with torch.inference_mode():
        members[0](first)  # keeps the others' outputs for `first`
        assert torch.equal(members[1](second), alone[1])
        assert torch.equal(members[2](second), alone[2])


@pytest.mark.parametrize("case", ["fp32", "DoRA", "grouped path", "reference"])
def test_what_the_group_cannot_serve_runs_member_by_member(case, monkeypatch):
    members = make_members(bias=True, dtype=torch.float32 if case == "fp32" else torch.bfloat16,
                           gain=case == "DoRA")
    if case == "grouped path":
        monkeypatch.setattr("deltaw.adapters.lora.routed.DENSE_MAX_RANK", 0)
    members[0].routing.set(ROUTES["mixed"])
    members[0].routing.reference = case == "reference"
    x = torch.randn(5, 2, 32).to(members[0].weight.dtype)
    alone = outputs(members, x, None)
    group = SiblingGroup(members)
    together = outputs(members, x, group)
    assert group._weight is None  # never computed together
    assert all(torch.equal(a, b) for a, b in zip(alone, together))


def test_the_bank_groups_attention_inputs_and_mlp_inputs():
    bank = AdapterBank(make_tiny_llama(dtype=torch.bfloat16))
    layers = bank.stores["lora"].layers
    attention = [layers[f"model.layers.0.self_attn.{name}"] for name in ("q_proj", "k_proj", "v_proj")]
    mlp = [layers[f"model.layers.0.mlp.{name}"] for name in ("gate_proj", "up_proj")]
    assert attention[0].group is not None and attention[0].group.members == attention
    assert mlp[0].group is not None and mlp[0].group.members == mlp
    assert layers["model.layers.0.self_attn.o_proj"].group is None
    assert layers["model.layers.0.mlp.down_proj"].group is None
