"""Merge and unmerge: merged = unmerged output, unmerge exact bit for bit, switching never drifts or stacks."""

import pytest
import torch

import deltaw
from tests.conftest import make_tiny_llama, randomize_lora_b


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}


def with_adapters(dtype=torch.float32):
    model = make_tiny_llama(dtype=dtype)
    deltaw.add_lora(model, deltaw.LoRAConfig(rank=4, alpha=8), name="a")
    randomize_lora_b(model, "a", seed=1)
    deltaw.add_lora(model, deltaw.LoRAConfig(rank=8, alpha=4, targets=[r".*mlp\..*"]), name="b")
    randomize_lora_b(model, "b", seed=2)
    return model


def test_merged_logits_equal_unmerged(tokens):
    model = with_adapters()
    deltaw.set_adapter(model, "a")
    unmerged = model(tokens).logits
    deltaw.merge_adapter(model, "a")
    assert deltaw.merged_adapter(model) == "a"
    assert (model(tokens).logits - unmerged).abs().max() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unmerge_restores_base_weights_bit_for_bit(dtype, tokens):
    model = with_adapters(dtype)
    base = weights(model)
    deltaw.merge_adapter(model, "a")
    assert not all(torch.equal(base[k], v) for k, v in weights(model).items())
    assert deltaw.unmerge_adapter(model) == "a"
    after = weights(model)
    assert all(torch.equal(base[k], after[k]) for k in base)


def test_merge_buffers_are_reused_and_released_on_request():
    model = with_adapters()
    layer = model.model.layers[0].mlp.up_proj
    deltaw.merge_adapter(model, "a")
    buffer = layer.unmerged_weight.data_ptr()
    deltaw.unmerge_adapter(model)
    deltaw.merge_adapter(model, "b")
    assert layer.unmerged_weight.data_ptr() == buffer  # no new allocation per merge
    deltaw.unmerge_adapter(model, release_memory=True)
    assert all(layer.unmerged_weight is None for _, layer in deltaw.adapters.lora.lora_layers(model))


def test_merging_after_the_base_weight_changed_uses_the_new_base():
    """The kept copy is refreshed on every merge from the unmerged state: it never goes stale."""
    model = with_adapters()
    layer = model.model.layers[0].mlp.up_proj
    deltaw.merge_adapter(model, "a")
    deltaw.unmerge_adapter(model)
    with torch.no_grad():
        layer.weight.add_(1.0)
    new_base = layer.weight.detach().clone()
    deltaw.merge_adapter(model, "a")
    deltaw.unmerge_adapter(model)
    assert torch.equal(layer.weight, new_base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_thousand_switches_equal_one_fresh_merge(dtype):
    model = with_adapters(dtype)
    fresh = with_adapters(dtype)
    for i in range(1000):
        deltaw.merge_adapter(model, "a" if i % 2 == 0 else "b")
    deltaw.merge_adapter(fresh, "b")
    switched, once = weights(model), weights(fresh)
    assert all(torch.equal(switched[k], once[k]) for k in once)


def test_merging_while_another_is_merged_replaces_it(tokens):
    model = with_adapters()
    deltaw.set_adapter(model, "b")
    b_unmerged = model(tokens).logits
    deltaw.merge_adapter(model, "a")
    deltaw.merge_adapter(model, "b")
    assert (model(tokens).logits - b_unmerged).abs().max() <= 1e-5
    # layers only "a" adapts are back at their base weights, not left holding a's delta
    attention = model.model.layers[0].self_attn.q_proj
    assert attention.merged is None and torch.equal(attention.weight, attention.base_weight())


def test_merge_delta_is_scaling_b_a_in_float32():
    model = with_adapters(torch.bfloat16)
    layer = model.model.layers[1].mlp.down_proj
    base = layer.weight.detach().clone()
    deltaw.merge_adapter(model, "b")
    expected = (base.float() + layer.scaling["b"] * layer.lora_B["b"].float() @ layer.lora_A["b"].float())
    assert torch.equal(layer.weight, expected.to(torch.bfloat16))


def test_merge_of_the_merged_adapter_is_a_no_op():
    model = with_adapters()
    deltaw.merge_adapter(model, "a")
    merged = weights(model)
    deltaw.merge_adapter(model, "a")
    assert all(torch.equal(merged[k], v) for k, v in weights(model).items())


def test_unmerge_with_nothing_merged_returns_none():
    model = with_adapters()
    assert deltaw.unmerge_adapter(model) is None
