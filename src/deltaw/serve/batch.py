"""The running batch's KV cache and attention mask: join newcomers, drop rows, trim padding.

All caches are left-padded (see the sketch in serve/engine.py): keys/values per layer are
[rows, kv_heads, columns, head_dim] and the mask is [rows, columns] with 0 on padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import Cache

from deltaw import compat


def left_pad(tensor: torch.Tensor, columns: int, dim: int) -> torch.Tensor:
    """Prepend `columns` zeros along `dim` (a negative dim, counted from the end)."""
    if columns == 0:
        return tensor
    pad = [0, 0] * (-dim - 1) + [columns, 0]
    return F.pad(tensor, pad)


def join(
    cache: Cache | None, mask: torch.Tensor | None, new_cache: Cache, new_mask: torch.Tensor
) -> tuple[Cache, torch.Tensor]:
    """Rows of `new_cache` appended below those of `cache`, both left-padded to the longer one."""
    if cache is None:
        return new_cache, new_mask
    columns = max(mask.shape[1], new_mask.shape[1])
    old_pad, new_pad = columns - mask.shape[1], columns - new_mask.shape[1]
    for layer, new_layer in zip(compat.cache_layers(cache), compat.cache_layers(new_cache), strict=True):
        layer.keys = torch.cat([left_pad(layer.keys, old_pad, -2), left_pad(new_layer.keys, new_pad, -2)])
        layer.values = torch.cat([left_pad(layer.values, old_pad, -2), left_pad(new_layer.values, new_pad, -2)])
    mask = torch.cat([left_pad(mask, old_pad, -1), left_pad(new_mask, new_pad, -1)])
    return cache, mask


def keep_rows(cache: Cache, mask: torch.Tensor, rows: list[int]) -> tuple[Cache, torch.Tensor]:
    """Only `rows` (in that order), then without the leading columns that are padding in all of them."""
    index = torch.tensor(rows, dtype=torch.long, device=mask.device)
    mask = mask.index_select(0, index)
    real = mask.any(dim=0).nonzero()
    start = int(real[0]) if len(real) else mask.shape[1]
    mask = mask[:, start:]
    for layer in compat.cache_layers(cache):
        layer.keys = layer.keys.index_select(0, index)[:, :, start:]
        layer.values = layer.values.index_select(0, index)[:, :, start:]
    return cache, mask


def prompt_batch(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded (input_ids, attention_mask, position_ids), each [rows, longest prompt]."""
    columns = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), columns), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), columns, dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, columns - len(ids):] = torch.tensor(ids, dtype=torch.long)
        mask[row, columns - len(ids):] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return input_ids, mask, positions
