"""DoRA on LoRALinear: a fresh adapter is the base, the forward is the paper's formula with the norm detached,
dropout as PEFT, exact merge / unmerge / switch, and QLoRA + DoRA on the dequantized weight."""

import pytest
import torch
import torch.nn.functional as F

import deltaw
from deltaw.models.quantized import quantize_model
from tests.conftest import make_tiny_llama


def perturb(model, seed=1, std=0.1):
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data += torch.randn(param.shape, generator=generator) * std


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}


def with_dora(dtype=torch.float32, **overrides):
    model = make_tiny_llama(dtype=dtype)
    deltaw.add_lora(model, deltaw.LoRAConfig(**{"rank": 4, "alpha": 8, "use_dora": True, **overrides}))
    return model


def reference_dora(layer, name, x):
    """The paper's formula from scratch: m ⊙ (W + sBA) / ‖W + sBA‖_row applied to x, norm detached."""
    weight = layer.base_weight().detach() + layer.scaling[name] * layer.lora_B[name] @ layer.lora_A[name]
    norm = weight.norm(dim=1).detach()
    return F.linear(x, weight * (layer.lora_magnitude[name] / norm)[:, None], layer.bias)


def test_a_fresh_dora_adapter_computes_the_base_model(tokens):
    model = with_dora()
    with deltaw.disable_adapters(model):
        base = model(tokens).logits
    assert torch.equal(model(tokens).logits, base)
    layer = model.model.layers[0].mlp.up_proj
    assert torch.equal(layer.lora_magnitude["default"], torch.linalg.norm(layer.weight.detach(), dim=1))


def test_forward_and_gradients_equal_the_formula_with_a_detached_norm():
    model = with_dora()
    perturb(model)
    layer = model.model.layers[1].self_attn.q_proj
    x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(2))
    ours, reference = layer(x), reference_dora(layer, "default", x)
    assert (ours - reference).abs().max() <= 1e-5
    params = [layer.lora_A["default"], layer.lora_B["default"], layer.lora_magnitude["default"]]
    ours_grads = torch.autograd.grad(ours.square().sum(), params)
    reference_grads = torch.autograd.grad(reference.square().sum(), params)
    for got, expected in zip(ours_grads, reference_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_dropout_follows_peft_base_on_the_full_input_adapter_on_the_dropped_one():
    model = with_dora(dropout=0.5)
    perturb(model)
    model.train()
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(2, 4, layer.in_features, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(9)
    ours = layer(x)
    torch.manual_seed(9)
    dropped = F.dropout(x, 0.5, training=True)
    gain = layer.lora_magnitude["default"] / layer.dora_norms("default")
    base_dropped = F.linear(dropped, layer.weight)
    lora = layer.scaling["default"] * F.linear(F.linear(dropped, layer.lora_A["default"]), layer.lora_B["default"])
    expected = F.linear(x, layer.weight, layer.bias) + (gain - 1) * base_dropped + gain * lora
    assert (ours - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_equals_unmerged_and_unmerge_is_exact(tokens, dtype):
    model = with_dora(dtype=dtype)
    perturb(model)
    base = weights(model)
    unmerged = model(tokens).logits
    deltaw.merge_adapter(model, "default")
    tolerance = 1e-5 if dtype == torch.float32 else 0.1
    assert (model(tokens).logits - unmerged).abs().max() <= tolerance
    deltaw.unmerge_adapter(model)
    assert all(torch.equal(base[k], v) for k, v in weights(model).items())


def test_switching_between_a_dora_and_a_lora_adapter_by_merging_never_drifts(tokens):
    model = with_dora()
    deltaw.add_lora(model, deltaw.LoRAConfig(rank=2, alpha=4, targets=[r".*mlp\..*"]), name="plain")
    perturb(model)
    deltaw.merge_adapter(model, "default")
    first = weights(model)
    deltaw.merge_adapter(model, "plain")
    deltaw.merge_adapter(model, "default")
    assert all(torch.equal(first[k], v) for k, v in weights(model).items())
    deltaw.unmerge_adapter(model)
    deltaw.set_adapter(model, "default")
    unmerged = model(tokens).logits
    deltaw.merge_adapter(model, "default")
    assert (model(tokens).logits - unmerged).abs().max() <= 1e-5


def test_qlora_dora_uses_the_dequantized_weight_and_merges_into_nf4(tokens):
    model = make_tiny_llama()
    quantize_model(model)
    deltaw.add_lora(model, deltaw.LoRAConfig(rank=4, alpha=8, use_dora=True))
    perturb(model)
    layer = model.model.layers[0].self_attn.v_proj
    x = torch.randn(2, 3, layer.in_features, generator=torch.Generator().manual_seed(5))
    expected = reference_dora(layer, "default", x)  # base_weight() is the dequantized NF4 weight
    assert (layer(x) - expected).abs().max() <= 1e-5
    packed = layer.weight.packed.clone()
    unmerged = model(tokens).logits
    deltaw.merge_adapter(model, "default")
    assert layer.merge_error is not None and 0 < layer.merge_error < 1
    assert (model(tokens).logits - unmerged).abs().max() < 0.5  # re-quantized: close, not exact
    deltaw.unmerge_adapter(model)
    assert torch.equal(layer.weight.packed, packed)


def test_a_trained_dora_adapter_round_trips_through_its_files(tmp_path, tokens):
    model = with_dora(targets=[r".*(q|v)_proj"])
    perturb(model)
    expected = model(tokens).logits
    path = deltaw.save_adapter(model, tmp_path / "a", "default")
    fresh = make_tiny_llama()
    deltaw.load_adapter(fresh, path, "a")
    deltaw.set_adapter(fresh, "a")
    assert torch.equal(fresh(tokens).logits, expected)
    assert "DoRA" in deltaw.describe_adapter(path) and "magnitude vectors on 4 modules" in deltaw.describe_adapter(path)


def test_dora_on_an_embedding_is_refused_before_the_model_is_touched():
    model = make_tiny_llama()
    with pytest.raises(ValueError, match="DoRA is for linear layers; 'model.embed_tokens' is an embedding"):
        deltaw.add_lora(model, deltaw.LoRAConfig(use_dora=True, targets=[r".*q_proj", r".*embed_tokens"]))
    assert not list(deltaw.adapters.lora.adapter_layers(model)) and not deltaw.list_adapters(model)


def plain_dora_output(result, lora_result, gain, bias, scaling):
    """DoRAOutput's forward expression left to autograd (which keeps every intermediate)."""
    base_result = result if bias is None else result - bias
    return (result + ((gain - 1) * base_result + gain * lora_result * scaling)).to(result.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_memory_lean_backward_equals_autograd_with_a_bias(dtype, monkeypatch):
    """DoRAOutput keeps only its output for g's gradient; with a bias, and with a bf16 base under autocast."""
    layer = deltaw.LoRALinear(torch.nn.Linear(24, 40, bias=True).to(dtype))
    generator = torch.Generator().manual_seed(6)
    layer.add_adapter("d", torch.randn(3, 24, generator=generator) * 0.2, torch.randn(40, 3, generator=generator) * 0.2,
                      2.0, magnitude=torch.rand(40, generator=generator) + 0.5)
    params = [layer.lora_A["d"], layer.lora_B["d"], layer.lora_magnitude["d"]]
    for param in params:
        param.requires_grad_(True)
    layer.active = "d"
    x = torch.randn(2, 5, 24, generator=generator).to(dtype).requires_grad_(True)

    def outputs_and_grads():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = layer(x)
        return out, torch.autograd.grad(out.float().square().sum(), [x, *params])

    ours, ours_grads = outputs_and_grads()
    if dtype == torch.float32:
        assert (ours - reference_dora(layer, "d", x)).abs().max() <= 1e-5
    monkeypatch.setattr(deltaw.adapters.lora.layer.DoRAOutput, "apply", plain_dora_output)
    plain, plain_grads = outputs_and_grads()
    if dtype == torch.float32:
        assert torch.equal(ours, plain)  # PEFT's terms in PEFT's order
    else:  # the short form: the same up to bf16 rounding
        assert (ours.float() - plain.float()).abs().max() <= 1e-2 * plain.float().abs().max()
    for got, want in zip(ours_grads, plain_grads):
        scale = 1e-5 if dtype == torch.float32 else 2e-2
        assert (got.float() - want.float()).abs().max() <= scale * want.float().abs().max()
