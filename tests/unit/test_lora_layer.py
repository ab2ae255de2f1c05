"""LoRALinear: the formula, fresh adapters are exact no-ops, keys unchanged, only adapters train."""

import math

import pytest
import torch
from torch import nn

import deltaw
from deltaw.adapters.lora.layer import LoRALinear, init_lora_weights
from tests.conftest import randomize_lora_b


def test_fresh_adapter_gives_bit_identical_logits(tiny, tokens):
    base = tiny(tokens).logits
    deltaw.add_lora(tiny, deltaw.LoRAConfig(rank=8, alpha=16))
    assert torch.equal(tiny(tokens).logits, base)


def test_base_state_dict_keys_and_values_unchanged_by_injection(tiny):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    deltaw.add_lora(tiny, deltaw.LoRAConfig(rank=4))
    after = tiny.state_dict()
    assert set(before) <= set(after)
    assert all(torch.equal(before[k], after[k]) for k in before)
    extra = set(after) - set(before)
    assert extra and all(".lora_A." in k or ".lora_B." in k for k in extra)


def test_base_checkpoint_loads_into_injected_model_without_remapping(tiny, tokens):
    donor = tiny.state_dict()
    injected = type(tiny)(tiny.config).eval()
    deltaw.add_lora(injected, deltaw.LoRAConfig(rank=4))
    missing, unexpected = injected.load_state_dict(donor, strict=False)
    assert unexpected == [] and all("lora_" in k for k in missing)
    assert torch.equal(injected(tokens).logits, tiny(tokens).logits)


def test_only_adapter_parameters_require_grad(tiny):
    report = deltaw.add_lora(tiny, deltaw.LoRAConfig(rank=4))
    trainable = [n for n, p in tiny.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert report.trainable == sum(p.numel() for p in tiny.parameters() if p.requires_grad)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_forward_is_wx_plus_scaled_b_a_x(use_rslora):
    torch.manual_seed(0)
    linear = nn.Linear(12, 7, bias=True)
    layer = LoRALinear(linear)
    a, b = torch.randn(3, 12), torch.randn(7, 3)
    scaling = deltaw.adapters.lora.config.lora_scaling(6.0, 3, use_rslora)
    assert scaling == pytest.approx(6 / math.sqrt(3) if use_rslora else 2.0)
    layer.add_adapter("x", a, b, scaling)
    layer.active = "x"
    x = torch.randn(5, 4, 12)
    expected = x @ linear.weight.T + linear.bias + scaling * (x @ a.T) @ b.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    layer.active = None
    torch.testing.assert_close(layer(x), linear(x))


def test_rslora_scaling_reaches_the_layers(tiny):
    deltaw.add_lora(tiny, deltaw.LoRAConfig(rank=16, alpha=8, use_rslora=True))
    layer = tiny.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(8 / 4)


def test_dropout_acts_on_the_adapter_input_in_training_only():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 8))
    layer.add_adapter("d", torch.randn(4, 16), torch.randn(8, 4), 1.0, dropout=0.5)
    layer.active = "d"
    x = torch.randn(32, 16)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    first, second = layer(x), layer(x)
    assert not torch.equal(first, second)
    layer.active = None
    assert torch.equal(layer(x), layer(x))  # the base path never sees dropout


def test_init_kaiming_bound_and_gaussian_std_and_zero_b():
    a, b = init_lora_weights(400, 30, 8, "kaiming", torch.float32, torch.device("cpu"))
    assert a.abs().max() <= 1 / math.sqrt(400) and a.abs().max() > 0.9 / math.sqrt(400)
    assert torch.count_nonzero(b) == 0 and b.shape == (30, 8) and a.shape == (8, 400)
    a, _ = init_lora_weights(4000, 30, 8, "gaussian", torch.float32, torch.device("cpu"))
    assert a.std().item() == pytest.approx(1 / 8, rel=0.05)
    with pytest.raises(ValueError, match="kaiming"):
        init_lora_weights(4, 4, 2, "orthogonal", torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("name", ["copy", "train", "keys", "weight", "pirate-2"])
def test_any_valid_adapter_name_works(tiny, tokens, name):
    deltaw.add_lora(tiny, deltaw.LoRAConfig(rank=2), name=name)
    randomize_lora_b(tiny, name)
    changed = tiny(tokens).logits
    with deltaw.disable_adapters(tiny):
        base = tiny(tokens).logits
    assert not torch.allclose(changed, base)
    assert any(k.endswith(f".lora_A.{name}") for k in tiny.state_dict())


@pytest.mark.parametrize("name", ["", "a.b", "x y", "a" * 65, None])
def test_invalid_adapter_names_are_refused(tiny, name):
    with pytest.raises(ValueError, match="invalid adapter name"):
        deltaw.add_lora(tiny, deltaw.LoRAConfig(rank=2), name=name)


def test_bf16_base_with_fp32_adapter(tokens):
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama(dtype=torch.bfloat16)
    deltaw.add_lora(model, deltaw.LoRAConfig(rank=4), dtype=torch.float32)
    layer = model.model.layers[0].mlp.down_proj
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_A["default"].dtype == torch.float32
    randomize_lora_b(model, "default")
    out = model(tokens).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    loss = out.float().logsumexp(-1).mean()
    loss.backward()
    assert layer.lora_B["default"].grad is not None and layer.weight.grad is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rank": 0}, "rank"), ({"rank": 2.5}, "rank"), ({"alpha": 0}, "alpha"),
        ({"dropout": 1.0}, "dropout"), ({"init": "zeros"}, "init"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        deltaw.LoRAConfig(**kwargs)
