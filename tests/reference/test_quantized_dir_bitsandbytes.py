"""A `deltaw quantize` directory is a bitsandbytes 4-bit checkpoint: transformers + bitsandbytes load it."""

import pytest
import torch

from deltaw.quant.linear import quantized_layers
from deltaw.models.quantized import quantize_model, save_quantized

bnb = pytest.importorskip("bitsandbytes")


def test_transformers_with_bitsandbytes_loads_a_deltaw_quantized_directory(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    # bitsandbytes' CPU kernels need in_features divisible by the block size (64)
    config = LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    quantize_model(model)
    save_quantized(model, tokenizer, tmp_path / "q")
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path / "q"), dtype=torch.float32)
    ours = quantized_layers(model)
    loaded = {name: m for name, m in theirs.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert sorted(loaded) == sorted(ours)
    for name, layer in loaded.items():
        state = layer.weight.quant_state
        assert torch.equal(layer.weight.data.reshape(-1), ours[name].packed)
        assert torch.equal(state.absmax, ours[name].absmax) and state.nested and state.offset == pytest.approx(
            ours[name].offset)
    tokens = torch.randint(0, 1000, (2, 7))
    with torch.no_grad():
        expected = model(tokens).logits
    with torch.no_grad():
        got = theirs(tokens).logits
    # bitsandbytes' CPU kernel repacks the weight and rounds absmax to bf16 (0.4% here), hence 2% and not exact
    assert (got - expected).abs().max() <= 2e-2 * expected.abs().max()
