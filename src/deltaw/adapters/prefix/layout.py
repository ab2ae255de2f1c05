"""The prefix layout: PEFT's flat `prompt_embeddings` [T, layers·2·kv_heads·head_dim] and the per-layer view.

The last dimension of the flat layout runs over (layer, key/value, kv head, head_dim), slowest first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class PrefixShape:
    """The key/value geometry of a model's attention layers."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    @property
    def token_dim(self) -> int:
        """kv_heads · head_dim: PEFT's `token_dim` for grouped-query attention."""
        return self.num_kv_heads * self.head_dim

    @property
    def width(self) -> int:
        """layers · 2 · token_dim: the last dimension of `prompt_embeddings`."""
        return self.num_layers * 2 * self.token_dim

    @classmethod
    def of_model(cls, model: nn.Module) -> PrefixShape:
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim)


def split_prefix(flat: torch.Tensor, shape: PrefixShape) -> torch.Tensor:
    """PEFT's flat prefix [T, layers·2·kv_heads·head_dim] -> [layers, 2 (key, value), kv_heads, T, head_dim]."""
    tokens = flat.shape[0]
    return flat.view(tokens, shape.num_layers, 2, shape.num_kv_heads, shape.head_dim).permute(1, 2, 3, 0, 4)


def join_prefix(keys_values: torch.Tensor) -> torch.Tensor:
    """The inverse of split_prefix: [layers, 2, kv_heads, T, head_dim] -> [T, layers·2·kv_heads·head_dim]."""
    return keys_values.permute(3, 0, 1, 2, 4).reshape(keys_values.shape[3], -1)
