"""The transformers internals deltaw relies on, in one place (tested by tests/unit/test_compat.py).

transformers moves under its users: 5.24 renamed the KV-cache argument and output field
`past_key_values` to `cache`, and deltaw's prefix-tuning read the old name (seven tests failed).
Everything below public API that deltaw touches goes through this module, so that the next change
breaks one function here and one clearly named test:

    attention functions   register_attention, sdpa_attention, eager_attention: the call convention
                          (module, query, key, value, mask, **kwargs) of transformers' attention interface
    attention choice      attention_implementation, set_attention_implementation
    the decoder stack     decoder(model): where the prefix pre-hook and the chunked loss attach;
                          decoder_layers(model): the blocks FSDP shards one by one
    KV caches             new_cache (optionally with room to grow in place), find_cache (by type, whatever it
                          is called), cache_argument (the forward keyword), cache_layers (per-layer keys/values
                          the serving engine joins and trims)
    loading               load_gguf (GGUF files dequantized to float), empty_model (no weight init)
    tied embeddings       mark_untied: the config of a model whose head no longer shares the embedding
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, Cache, DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

AttentionFunction = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
"""(module, query [b, heads, q, d], key [b, kv_heads, kv, d], value [b, kv_heads, kv, d], mask, **kwargs)
-> (output [b, q, heads, d], weights or None): the signature of transformers' attention functions."""


# --------------------------------------------------------------------------------------------- attention
def register_attention(name: str, function: AttentionFunction, masks_like: str) -> None:
    """Make `model.set_attn_implementation(name)` run `function`, with the masks built for `masks_like`
    ("sdpa": 4-D bool, True attends, or None for plain causal; "eager": 4-D additive float)."""
    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, sdpa_mask if masks_like == "sdpa" else eager_mask)


def sdpa_attention() -> AttentionFunction:
    """transformers' own SDPA attention function."""
    return sdpa_attention_forward


def eager_attention(module: nn.Module) -> AttentionFunction:
    """The eager attention function of the model that `module` (an attention layer) belongs to."""
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise ValueError(f"{type(module).__name__} has no eager_attention_forward; use attention 'sdpa'")
    return eager


def attention_implementation(model: nn.Module) -> str:
    """The name of the attention function `model` runs ("sdpa" when the config leaves it unset)."""
    return getattr(model.config, "_attn_implementation", None) or "sdpa"


def set_attention_implementation(model: nn.Module, name: str) -> None:
    model.set_attn_implementation(name)


def decoder(model: nn.Module) -> nn.Module:
    """The decoder stack of a causal LM (embeddings, layers, final norm; no head): it returns hidden states."""
    return model.base_model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a causal LM, in order (`model.model.layers` for Llama, Qwen, Gemma, Mistral)."""
    layers = getattr(decoder(model), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: no decoder layers at .{model.base_model_prefix}.layers, "
                         "so FSDP cannot shard it layer by layer; train it without --fsdp")
    return layers


# --------------------------------------------------------------------------------------------- KV caches
CACHE_ROOM = 64  # columns a roomy cache layer allocates ahead, so most decode steps write in place


class _RoomyLayer(DynamicLayer):
    """A DynamicLayer whose keys/values are views of buffers with CACHE_ROOM spare columns: a decode step
    writes its column in place instead of concatenating the whole cache (one copy every CACHE_ROOM steps).
    Replacing `keys`/`values` from outside (the serving engine joins and trims rows) is allowed: the next
    update then reallocates."""

    _key_buffer: torch.Tensor | None = None
    _value_buffer: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Append key_states/value_states [batch, kv_heads, new, head_dim]; return the whole keys/values."""
        if not self.is_initialized or self.keys.numel() == 0:
            self.lazy_initialization(key_states, value_states)
            self._key_buffer = self._value_buffer = None
            self.keys, self.values = key_states[:, :, :0], value_states[:, :, :0]
        used, new = self.keys.shape[-2], key_states.shape[-2]
        if not (_fits(self.keys, self._key_buffer, used + new) and _fits(self.values, self._value_buffer, used + new)):
            self._key_buffer = _with_room(self.keys, used + new + CACHE_ROOM)
            self._value_buffer = _with_room(self.values, used + new + CACHE_ROOM)
        self._key_buffer[:, :, used:used + new] = key_states
        self._value_buffer[:, :, used:used + new] = value_states
        self.keys, self.values = self._key_buffer[:, :, :used + new], self._value_buffer[:, :, :used + new]
        return self.keys, self.values


def _fits(view: torch.Tensor, buffer: torch.Tensor | None, columns: int) -> bool:
    """Whether `view` is still the head of `buffer` (not replaced from outside) and `buffer` has `columns`."""
    return (buffer is not None and view.data_ptr() == buffer.data_ptr() and view.shape[:2] == buffer.shape[:2]
            and columns <= buffer.shape[2])


def _with_room(tensor: torch.Tensor, columns: int) -> torch.Tensor:
    """A [batch, heads, columns, head_dim] buffer starting with `tensor`'s columns."""
    buffer = tensor.new_empty(*tensor.shape[:2], columns, tensor.shape[3])
    buffer[:, :, :tensor.shape[2]] = tensor
    return buffer


def new_cache(roomy: bool = False) -> Cache:
    """An empty cache that grows with every forward (one layer object per decoder layer). `roomy`: its layers
    preallocate CACHE_ROOM columns ahead and write new tokens in place (the serving engine's decode steps);
    either way `cache_layers` gives per-layer keys/values that may be replaced."""
    cache = DynamicCache()
    if roomy:
        cache.layer_class_to_replicate = _RoomyLayer
    return cache


def find_cache(values: Iterable[Any]) -> Cache | None:
    """The KV cache among a forward's arguments or an output's fields, found by its type, not its name
    (`past_key_values` up to transformers 5.23, `cache` from 5.24)."""
    return next((value for value in values if isinstance(value, Cache)), None)


def cache_argument(model: nn.Module, cache: Cache) -> dict[str, Cache]:
    """The keyword with which `model`'s forward takes a cache: {"cache": cache} from transformers 5.24,
    {"past_key_values": cache} before (the old keyword still works in 5.24 with a warning, until 5.40)."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


def cache_layers(cache: Cache) -> list[Any]:
    """The cache's per-layer entries; each has `keys` and `values` [batch, kv_heads, tokens, head_dim], which
    may be read and replaced (the serving engine joins, drops and trims rows this way)."""
    return list(cache.layers)


# --------------------------------------------------------------------------------------------- loading
def load_gguf(directory: str, filename: str, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    """(model, tokenizer) from a GGUF file: transformers dequantizes every tensor to plain float `nn.Linear`
    weights in `dtype`; the GGUF "quantization" marks are dropped so the model saves like any other."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=dtype)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def empty_model(config: Any, dtype: torch.dtype) -> nn.Module:
    """The causal LM of `config` without running weight initialisation (its tensors are loaded next)."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with no_init_weights():
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


# --------------------------------------------------------------------------------------------- tied embeddings
def mark_untied(model: nn.Module) -> bool:
    """If the input embedding and the output head hold different tensors while the config says they are tied,
    say untied in the config (so a saved model keeps both); returns whether it changed anything."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if embedding is None or head is None or embedding.weight is head.weight:
        return False
    configs = {id(config): config for config in (model.config, model.config.get_text_config())}.values()
    tied = [config for config in configs if getattr(config, "tie_word_embeddings", False)]
    for config in tied:
        config.tie_word_embeddings = False
    return bool(tied)
