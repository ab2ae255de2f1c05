"""Each transformers internal deltaw relies on (deltaw.compat), checked on its own: when transformers changes one,
the test that names it fails here, before the features built on it fail elsewhere."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import LlamaConfig

from deltaw import compat
from tests.conftest import make_tiny_llama


def test_a_registered_attention_function_gets_queries_keys_values_and_the_mask(tokens):
    """register_attention: transformers calls the function by name with (module, q, k, v, mask, **kwargs) after
    RoPE and the cache update, and the model's output is what that function returns."""
    seen = []

    def recording(module, query, key, value, mask, **kwargs):
        seen.append((module.layer_idx, query.shape, key.shape, value.shape, mask))
        return compat.sdpa_attention()(module, query, key, value, mask, **kwargs)

    compat.register_attention("deltaw_test_recording", recording, masks_like="sdpa")
    model = make_tiny_llama()
    with torch.no_grad():
        expected = model(input_ids=tokens).logits
        model.set_attn_implementation("deltaw_test_recording")
        found = model(input_ids=tokens).logits
    assert [entry[0] for entry in seen] == [0, 1]  # layer_idx on every attention module
    batch, length = tokens.shape
    assert seen[0][1:4] == ((batch, 4, length, 16), (batch, 2, length, 16), (batch, 2, length, 16))
    assert torch.equal(found, expected)


def test_eager_attention_is_the_model_modules_own_function(tokens):
    model = make_tiny_llama()
    attention = model.model.layers[0].self_attn
    eager = compat.eager_attention(attention)
    assert eager.__module__ == type(attention).__module__
    with torch.no_grad():
        expected = model(input_ids=tokens).logits
        model.set_attn_implementation("eager")
        assert (model(input_ids=tokens).logits - expected).abs().max() < 1e-5
    assert compat.attention_implementation(model) == "eager"


def test_the_decoder_stack_returns_hidden_states_and_its_pre_hook_sees_the_cache(tokens):
    """decoder(): the module under the head; a forward pre-hook on it receives the cache (found by type, whatever
    the keyword) and the position ids and mask the caller gave."""
    model = make_tiny_llama()
    decoder = compat.decoder(model)
    seen = {}
    decoder.register_forward_pre_hook(lambda module, args, kwargs: seen.update(kwargs), with_kwargs=True)
    with torch.no_grad():
        hidden = decoder(input_ids=tokens).last_hidden_state
        assert hidden.shape == (*tokens.shape, 64)
        cache = compat.find_cache(model(input_ids=tokens[:, :6], use_cache=True).values())
        model(input_ids=tokens[:, 6:7], **compat.cache_argument(model, cache))
    assert compat.find_cache(seen.values()) is cache and cache.get_seq_length() == 7


def test_generate_gives_the_decoder_positions_or_a_2d_mask(tokens):
    """The prefix hook places real tokens after the prefix from the position ids, else from a 2-D mask."""
    model = make_tiny_llama()
    calls = []
    compat.decoder(model).register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs), with_kwargs=True)
    with torch.no_grad():
        model.generate(input_ids=tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=3, do_sample=False,
                       pad_token_id=0)
    for kwargs in calls:
        mask = kwargs.get("attention_mask")
        assert kwargs.get("position_ids") is not None or (isinstance(mask, torch.Tensor) and mask.ndim == 2)


def test_the_cache_keyword_is_accepted_without_a_deprecation_warning(tokens):
    model = make_tiny_llama()
    cache = compat.new_cache()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            model(input_ids=tokens, use_cache=True, **compat.cache_argument(model, cache))
    assert cache.get_seq_length() == tokens.shape[1]


def test_cache_layers_hold_keys_and_values_that_can_be_replaced(tokens):
    """What the serving engine does to join and drop rows: read and replace each layer's keys and values."""
    model = make_tiny_llama()
    cache = compat.new_cache()
    with torch.no_grad():
        model(input_ids=tokens, use_cache=True, **compat.cache_argument(model, cache))
        layers = compat.cache_layers(cache)
        assert len(layers) == 2 and layers[0].keys.shape == (2, 2, tokens.shape[1], 16) == layers[0].values.shape
        for layer in layers:  # keep row 1 only
            layer.keys, layer.values = layer.keys[1:], layer.values[1:]
        step = model(input_ids=tokens[1:, :1], use_cache=True, **compat.cache_argument(model, cache)).logits
        whole = model(input_ids=torch.cat([tokens[1:], tokens[1:, :1]], dim=1)).logits[:, -1:]
    assert (step - whole).abs().max() < 1e-5


@pytest.mark.parametrize("replace", [False, True])
def test_a_roomy_cache_decodes_in_place_and_equals_a_plain_one(tokens, replace):
    """new_cache(roomy=True): decode steps write into preallocated columns (the buffer stays put) and compute
    exactly what a plain cache computes; keys/values replaced from outside (the engine dropping a row) still work."""
    model = make_tiny_llama()
    roomy, plain = compat.new_cache(roomy=True), compat.new_cache()
    with torch.no_grad():
        for cache in (roomy, plain):
            model(input_ids=tokens, use_cache=True, **compat.cache_argument(model, cache))
            if replace:
                for layer in compat.cache_layers(cache):
                    layer.keys, layer.values = layer.keys[1:], layer.values[1:]
        rows = tokens[1:] if replace else tokens
        starts, outputs = [], {}
        for name, cache in (("roomy", roomy), ("plain", plain)):
            steps = []
            for step in range(4):
                steps.append(model(input_ids=rows[:, step:step + 1], use_cache=True,
                                   **compat.cache_argument(model, cache)).logits)
                if name == "roomy":
                    starts.append(compat.cache_layers(cache)[0].keys.data_ptr())
            outputs[name] = torch.cat(steps, dim=1)
    assert torch.equal(outputs["roomy"], outputs["plain"])
    assert len(set(starts)) == 1  # every step wrote into the same buffer (no concatenation)
    assert compat.cache_layers(roomy)[0].keys.shape == compat.cache_layers(plain)[0].keys.shape


def test_an_empty_model_has_the_configs_shapes_and_dtype():
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    model = compat.empty_model(config, torch.bfloat16)
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (16, 32)
    assert model.model.layers[0].self_attn.k_proj.weight.dtype == torch.bfloat16


@pytest.mark.slow
def test_a_gguf_file_loads_as_plain_float_linear_layers():
    from deltaw.models.loading import bundled_gguf

    path = bundled_gguf()
    model, tokenizer = compat.load_gguf(str(path.parent), path.name, torch.float32)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None and model.hf_quantizer is None
    assert tokenizer("Hello")["input_ids"]


def test_mark_untied_says_so_only_when_embedding_and_head_differ():
    model = make_tiny_llama(tie=True)
    assert compat.mark_untied(model) is False and model.config.tie_word_embeddings is True
    model.model.embed_tokens.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach() + 1)
    assert compat.mark_untied(model) is True and model.config.tie_word_embeddings is False
