"""Prefix-tuning: trainable keys and values prepended to every attention layer of a frozen model.

    layer l, key/value head h:     K' = [ P_K[l, h] ; K ]      V' = [ P_V[l, h] ; V ]
                                          [T, d]     [S, d]
    every query sees the T prefix columns, then the real tokens causally (padding stays masked);
    the prefix holds positions 0..T-1, so real tokens sit at positions T, T+1, ... (RoPE is applied
    to real keys and queries only; prefix keys are used as they are).

Li & Liang, "Prefix-Tuning: Optimizing Continuous Prompts for Generation" (2021).

The prefixes enter at transformers' attention interface, never through its cache objects (the path
that broke PEFT's prefix-tuning repeatedly: peft#1962, #2821). A forward pre-hook on the decoder
stack shifts the position ids by each row's T and passes the row's prefixes down as one keyword
argument; the attention functions registered here as `deltaw_prefix_sdpa` / `deltaw_prefix_eager`
concatenate them in front of the layer's keys and values, widen the mask by T columns and call
transformers' own sdpa or eager attention. The KV cache holds real tokens only, so every decode step
sees the prefix again. Grouped-query attention needs nothing special: prefixes exist per key/value
head, [batch, kv_heads, T, head_dim], exactly like the keys they join.

Which prefix a row uses is chosen per forward: the active adapter (`set_adapter`) for every row, or
`set_prefix_rows(model, [name | tensor | None, ...])` per row. A row without a prefix gets its prefix
columns masked out and its positions unshifted: it computes its base-model attention.

The flat layout of one adapter, `prompt_embeddings` [T, layers·2·kv_heads·head_dim], is PEFT's: the last
dimension runs over (layer, key/value, kv head, head_dim), slowest first.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from deltaw import attention, compat
from deltaw.adapters.prefix.layout import PrefixShape, split_prefix
from deltaw.adapters.state import adapters_of

PREFIX_STORE = "deltaw_prefixes"  # the submodule of a model that holds its prefix adapters
PREFIX_KWARG = "deltaw_prefix"
PREFIX_ATTENTION = {"sdpa": "deltaw_prefix_sdpa", "eager": "deltaw_prefix_eager",
                    attention.EAGER: "deltaw_prefix_deltaw_eager"}
_OUTER = "_deltaw_prefix_model"
_HOOKED = "_deltaw_prefix_hook"

Row = str | torch.Tensor | None


class PrefixStore(nn.Module):
    """The model's prefix adapters by name (kept in `_modules` directly, so any adapter name works),
    and the per-row selection `rows` (None: every row uses the active adapter)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[Row] | None = None

    def __contains__(self, name: str) -> bool:
        return name in self._modules

    def __getitem__(self, name: str) -> nn.Module:  # a PrefixEncoder (encoder.py)
        return self._modules[name]

    def __setitem__(self, name: str, encoder: nn.Module) -> None:
        self._modules[name] = encoder

    def __delitem__(self, name: str) -> None:
        del self._modules[name]


def prefix_store(model: nn.Module) -> PrefixStore:
    """The model's PrefixStore; attaching it (once) installs the pre-hook that feeds attention."""
    store = getattr(model, PREFIX_STORE, None)
    if store is None:
        store = PrefixStore()
        model.add_module(PREFIX_STORE, store)
        decoder = compat.decoder(model)
        decoder.__dict__[_OUTER] = model  # a plain reference (not a submodule); deepcopy maps it to the copy
        if not decoder.__dict__.get(_HOOKED):
            decoder.register_forward_pre_hook(_before_decoder, with_kwargs=True)
            decoder.__dict__[_HOOKED] = True
    return store


# --------------------------------------------------------------------------------------------- per-row choice
def set_prefix_rows(model: nn.Module, rows: Sequence[Row] | None) -> None:
    """Choose each batch row's prefix for the following forwards: an adapter name, a prefix tensor
    [T, layers·2·token_dim], or None (that row computes its base-model attention). `rows=None`
    returns to the active adapter for every row. The batch size must equal len(rows)."""
    store = prefix_store(model)
    if rows is not None:
        shape = PrefixShape.of_model(model)
        for index, row in enumerate(rows):
            if isinstance(row, str) and row not in store:
                raise KeyError(f"row {index}: no prefix adapter named {row!r}; prefix adapters: "
                               f"{list(store._modules) or 'none'}")
            if isinstance(row, torch.Tensor) and (row.ndim != 2 or row.shape[1] != shape.width):
                raise ValueError(f"row {index}: expected a prefix of shape [T, {shape.width}], found {list(row.shape)}")
        rows = list(rows)
    store.rows = rows


@contextmanager
def prefix_rows(model: nn.Module, rows: Sequence[Row] | None) -> Iterator[None]:
    """set_prefix_rows within the block; the previous selection is restored after it."""
    store = prefix_store(model)
    saved = store.rows
    set_prefix_rows(model, rows)
    try:
        yield
    finally:
        store.rows = saved


# --------------------------------------------------------------------------------------------- the forward
@dataclass
class PrefixBatch:
    """The prefixes of one forward pass.

    Attributes:
        keys, values: [layers, batch or 1, kv_heads, T, head_dim] (T: the longest prefix in the batch).
        visible: [batch or 1, T] bool: which prefix columns each row attends to.
    """

    keys: torch.Tensor
    values: torch.Tensor
    visible: torch.Tensor


def _row_prefixes(model: nn.Module, store: PrefixStore) -> list[torch.Tensor | None] | None:
    """The flat prefix of every row ([one] for the active adapter on all rows), or None if none is used."""
    if store.rows is not None:
        computed: dict[str, torch.Tensor] = {}
        rows = [computed.setdefault(row, store[row]()) if isinstance(row, str) else row for row in store.rows]
        return rows if any(row is not None for row in rows) else None
    active = adapters_of(model).active
    return [store[active]()] if active is not None and active in store else None


def _prefix_batch(rows: list[torch.Tensor | None], shape: PrefixShape) -> tuple[PrefixBatch, torch.Tensor]:
    """Pad the rows' prefixes to the longest: (PrefixBatch, offsets [rows] = each row's T, 0 without one)."""
    present = [row for row in rows if row is not None]
    longest = max(row.shape[0] for row in present)
    template = present[0]
    blocks, offsets = [], []
    for row in rows:
        tokens = 0 if row is None else row.shape[0]
        block = template.new_zeros(longest, shape.width)
        if row is not None:
            row = row.to(template.dtype)
            block = torch.cat([row, block[tokens:]]) if tokens < longest else row
        blocks.append(split_prefix(block, shape))
        offsets.append(tokens)
    stacked = torch.stack(blocks, dim=1)  # [layers, rows, 2, kv_heads, T, head_dim]
    offsets = torch.tensor(offsets, device=template.device)
    visible = torch.arange(longest, device=template.device)[None, :] < offsets[:, None]
    return PrefixBatch(stacked[:, :, 0], stacked[:, :, 1], visible), offsets


def _before_decoder(decoder: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook of the decoder stack: shift positions and hand the prefixes to attention."""
    model = decoder.__dict__[_OUTER]
    store = getattr(model, PREFIX_STORE, None)
    rows = _row_prefixes(model, store) if store is not None else None
    if rows is None:
        return None
    inputs = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
    if inputs is None and args:
        inputs = args[0]
    batch_size, seq_len = inputs.shape[0], inputs.shape[1]
    if len(rows) > 1 and len(rows) != batch_size:
        raise ValueError(f"set_prefix_rows gave {len(rows)} rows but the batch has {batch_size}; "
                         "give one entry per row (None for no prefix)")
    _use_prefix_attention(model)
    batch, offsets = _prefix_batch(rows, PrefixShape.of_model(model))
    kwargs = dict(kwargs)
    kwargs["position_ids"] = _positions(kwargs, batch_size, seq_len, inputs.device) + offsets[:, None]
    kwargs[PREFIX_KWARG] = batch
    return args, kwargs


def _positions(kwargs: dict, batch_size: int, seq_len: int, device: torch.device) -> torch.Tensor:
    """The rows' position ids without prefix: as given; else counted over the 2-D attention mask (so a
    padded row gets the positions of the same row unpadded, as in generate()); else after the cache."""
    if kwargs.get("position_ids") is not None:
        return kwargs["position_ids"]
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.ndim == 2:
        return (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq_len:].to(device)
    cache = compat.find_cache(kwargs.values())
    past = cache.get_seq_length() if cache is not None else 0
    return torch.arange(past, past + seq_len, device=device).expand(batch_size, -1)


def _use_prefix_attention(model: nn.Module) -> None:
    """Route the model's attention through the prefix functions (kept when the user switches sdpa/eager)."""
    current = compat.attention_implementation(model)
    if current in PREFIX_ATTENTION.values():
        return
    if current not in PREFIX_ATTENTION:
        raise ValueError(f"prefix-tuning works with attention 'sdpa' or 'eager', but the model uses {current!r}; "
                         "call model.set_attn_implementation('sdpa')")
    compat.set_attention_implementation(model, PREFIX_ATTENTION[current])


# --------------------------------------------------------------------------------------------- attention
def _widen_mask(mask: torch.Tensor | None, visible: torch.Tensor, query: torch.Tensor, kv_len: int) -> torch.Tensor:
    """The layer's mask [batch|1, 1|heads, q, kv] (bool: True attends; float: additive; None: causal)
    with T prefix columns in front: [batch, 1|heads, q, T + kv]."""
    batch, q_len = query.shape[0], query.shape[2]
    if mask is None:  # causal, the queries being the last q_len of the kv_len positions
        rows = torch.arange(q_len, device=query.device)[:, None] + (kv_len - q_len)
        mask = (torch.arange(kv_len, device=query.device)[None, :] <= rows)[None, None]
    mask = mask.expand(batch, -1, -1, -1)
    prefix = visible.expand(batch, -1)[:, None, None, :].expand(-1, mask.shape[1], mask.shape[2], -1)
    if mask.dtype != torch.bool:
        blocked = torch.finfo(mask.dtype).min
        prefix = torch.zeros((), dtype=mask.dtype, device=mask.device).masked_fill(~prefix, blocked)
    return torch.cat([prefix, mask], dim=-1)


def _prefixed(inner_name: str):
    """An attention function that prepends the forward's prefixes, then runs transformers' `inner_name`."""

    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs):
        """query: [batch, heads, q, d]; key, value: [batch, kv_heads, kv, d] (RoPE applied, cache included)."""
        inner = _inner_attention(module, inner_name)
        batch = kwargs.pop(PREFIX_KWARG, None)
        if batch is None:
            return inner(module, query, key, value, attention_mask, **kwargs)
        size, layer = key.shape[0], module.layer_idx
        mask = _widen_mask(attention_mask, batch.visible, query, key.shape[2])
        key = torch.cat([batch.keys[layer].to(key.dtype).expand(size, -1, -1, -1), key], dim=2)
        value = torch.cat([batch.values[layer].to(value.dtype).expand(size, -1, -1, -1), value], dim=2)
        return inner(module, query, key, value, mask, **kwargs)

    attention.__name__ = f"prefixed_{inner_name}_attention"
    return attention


def _inner_attention(module: nn.Module, inner_name: str):
    if inner_name == attention.EAGER:
        return attention.eager_attention
    return compat.sdpa_attention() if inner_name == "sdpa" else compat.eager_attention(module)


for _inner, _name in PREFIX_ATTENTION.items():
    compat.register_attention(_name, _prefixed(_inner), masks_like="sdpa" if _inner == "sdpa" else "eager")
