"""Many adapters on one base: switching, disabling, deleting; unknown names are always errors."""

import pytest
import torch

import deltaw
from tests.conftest import randomize_lora_b


@pytest.fixture
def two(tiny):
    deltaw.add_lora(tiny, deltaw.LoRAConfig(rank=4, alpha=8), name="a")
    randomize_lora_b(tiny, "a", seed=1)
    deltaw.add_lora(tiny, deltaw.LoRAConfig(rank=2, alpha=4, targets=[r".*\.(q|v)_proj"]), name="b")
    randomize_lora_b(tiny, "b", seed=2)
    return tiny


def test_set_adapter_switches_the_output(two, tokens):
    deltaw.set_adapter(two, "a")
    out_a = two(tokens).logits
    deltaw.set_adapter(two, "b")
    out_b = two(tokens).logits
    with deltaw.disable_adapters(two):
        base = two(tokens).logits
    assert not torch.allclose(out_a, out_b) and not torch.allclose(out_a, base) and not torch.allclose(out_b, base)
    deltaw.set_adapter(two, "a")
    assert torch.equal(two(tokens).logits, out_a)


def test_list_and_active(two):
    assert deltaw.list_adapters(two) == ["a", "b"]
    assert deltaw.active_adapter(two) == "b"  # add_lora activates the new adapter
    deltaw.set_adapter(two, "a")
    assert deltaw.active_adapter(two) == "a"


def test_an_adapter_on_a_subset_of_layers_leaves_the_others_at_base(two):
    deltaw.set_adapter(two, "b")
    assert two.model.layers[0].self_attn.q_proj.active == "b"
    assert two.model.layers[0].mlp.up_proj.active is None


def test_disable_adapters_restores_the_active_adapter(two, tokens):
    deltaw.set_adapter(two, "a")
    out_a = two(tokens).logits
    with pytest.raises(ZeroDivisionError):
        with deltaw.disable_adapters(two):
            assert deltaw.active_adapter(two) is None
            raise ZeroDivisionError
    assert deltaw.active_adapter(two) == "a"
    assert torch.equal(two(tokens).logits, out_a)


def test_unknown_names_are_errors_never_the_base(two):
    for call in (deltaw.set_adapter, deltaw.delete_adapter, deltaw.merge_adapter):
        with pytest.raises(KeyError, match="no adapter named 'c'.*'a', 'b'"):
            call(two, "c")
    assert deltaw.active_adapter(two) == "b"


def test_adding_an_existing_name_is_an_error(two):
    with pytest.raises(ValueError, match="already exists"):
        deltaw.add_lora(two, deltaw.LoRAConfig(rank=2), name="a")


def test_delete_adapter_removes_its_tensors(two, tokens):
    deltaw.delete_adapter(two, "b")
    assert deltaw.list_adapters(two) == ["a"]
    assert deltaw.active_adapter(two) is None
    assert not any(".lora_A.b" in k for k in two.state_dict())
    deltaw.set_adapter(two, "a")
    assert torch.isfinite(two(tokens).logits).all()


def test_deleting_or_disabling_a_merged_adapter_is_an_error(two):
    deltaw.merge_adapter(two, "a")
    with pytest.raises(RuntimeError, match="unmerge_adapter"):
        deltaw.delete_adapter(two, "a")
    with pytest.raises(RuntimeError, match="unmerge_adapter"):
        with deltaw.disable_adapters(two):
            pass
    with pytest.raises(RuntimeError, match="merged"):
        deltaw.set_adapter(two, "b")
    with pytest.raises(RuntimeError, match="merged"):
        deltaw.add_lora(two, deltaw.LoRAConfig(rank=2), name="c")
