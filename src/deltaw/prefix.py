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

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from deltaw.config import PrefixConfig
from deltaw.lora import check_adapter_name
from deltaw.manage import PREFIX_STORE, AdapterRecord, count_parameters, disable_adapters, registry, set_adapter

PREFIX_KWARG = "deltaw_prefix"
PREFIX_ATTENTION = {"sdpa": "deltaw_prefix_sdpa", "eager": "deltaw_prefix_eager"}
_OUTER = "_deltaw_prefix_model"
_HOOKED = "_deltaw_prefix_hook"

Row = str | torch.Tensor | None


# --------------------------------------------------------------------------------------------- shapes
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


# --------------------------------------------------------------------------------------------- parameters
class PrefixEncoder(nn.Module):
    """One prefix adapter's trainable parameters; forward() gives its prefixes [T, layers·2·token_dim].

    Direct: `prompt_embeddings` [T, width] are the prefixes, N(0, 1) at first (as PEFT's nn.Embedding).
    Reparameterized (projection_hidden), as PEFT's prefix_projection: `embedding` [T, token_dim] ->
    Linear(token_dim, hidden) -> Tanh -> Linear(hidden, width), initialised as nn.Linear is.
    """

    def __init__(self, shape: PrefixShape, config: PrefixConfig, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.shape, self.config = shape, config
        tokens, hidden = config.num_virtual_tokens, config.projection_hidden

        def parameter(*size: int, bound: float | None = None) -> nn.Parameter:
            values = torch.randn(size) if bound is None else torch.empty(size).uniform_(-bound, bound)
            return nn.Parameter(values.to(dtype=dtype, device=device))

        if hidden is None:
            self.prompt_embeddings = parameter(tokens, shape.width)
            return
        # plain parameters, not nn.Linear: the model's linear layers stay exactly the base model's
        self.embedding = parameter(tokens, shape.token_dim)
        self.hidden_weight = parameter(hidden, shape.token_dim, bound=shape.token_dim**-0.5)
        self.hidden_bias = parameter(hidden, bound=shape.token_dim**-0.5)
        self.output_weight = parameter(shape.width, hidden, bound=hidden**-0.5)
        self.output_bias = parameter(shape.width, bound=hidden**-0.5)

    @property
    def num_virtual_tokens(self) -> int:
        return self.config.num_virtual_tokens

    def forward(self) -> torch.Tensor:
        """The prefixes [T, layers·2·token_dim]."""
        if self.config.projection_hidden is None:
            return self.prompt_embeddings
        hidden = torch.tanh(F.linear(self.embedding, self.hidden_weight, self.hidden_bias))
        return F.linear(hidden, self.output_weight, self.output_bias)


class PrefixStore(nn.Module):
    """The model's prefix adapters by name (kept in `_modules` directly, so any adapter name works),
    and the per-row selection `rows` (None: every row uses the active adapter)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[Row] | None = None

    def __contains__(self, name: str) -> bool:
        return name in self._modules

    def __getitem__(self, name: str) -> PrefixEncoder:
        return self._modules[name]

    def __setitem__(self, name: str, encoder: PrefixEncoder) -> None:
        self._modules[name] = encoder

    def __delitem__(self, name: str) -> None:
        del self._modules[name]


def prefix_store(model: nn.Module) -> PrefixStore:
    """The model's PrefixStore; attaching it (once) installs the pre-hook that feeds attention."""
    store = getattr(model, PREFIX_STORE, None)
    if store is None:
        store = PrefixStore()
        model.add_module(PREFIX_STORE, store)
        decoder = model.base_model
        decoder.__dict__[_OUTER] = model  # a plain reference (not a submodule); deepcopy maps it to the copy
        if not decoder.__dict__.get(_HOOKED):
            decoder.register_forward_pre_hook(_before_decoder, with_kwargs=True)
            decoder.__dict__[_HOOKED] = True
    return store


@dataclass(frozen=True)
class PrefixReport:
    """What add_prefix did: the prefix geometry and parameter counts."""

    name: str
    config: PrefixConfig
    shape: PrefixShape
    trainable: int
    total: int

    def __str__(self) -> str:
        cfg, shape = self.config, self.shape
        projection = f", through an MLP of hidden size {cfg.projection_hidden}" if cfg.projection_hidden else ""
        return "\n".join([
            f"prefix adapter {self.name!r}: {cfg.num_virtual_tokens} virtual tokens x {shape.num_layers} layers x "
            f"2 x {shape.num_kv_heads} kv heads x {shape.head_dim} = "
            f"{cfg.num_virtual_tokens * shape.width:,} prefix values{projection} (init {cfg.init})",
            f"trainable {self.trainable:,} / {self.total:,} ({100 * self.trainable / self.total:.2f}%)",
        ])


def add_prefix(
    model: nn.Module,
    config: PrefixConfig,
    name: str = "default",
    dtype: torch.dtype = torch.float32,
    init_ids: torch.Tensor | None = None,
) -> PrefixReport:
    """Add a fresh prefix adapter `name`, make it active and the only trainable parameters.

    Args:
        config: the number of virtual tokens, the optional projection and the init.
        dtype: the prefix parameters' dtype (fp32 for training on a bf16 base).
        init_ids: [T'] token ids (T' >= T) whose first T keys and values start the prefix when
            config.init is "activations".
    """
    _check_new_name(model, name)
    shape = PrefixShape.of_model(model)
    device = next(model.parameters()).device
    encoder = PrefixEncoder(shape, config, dtype, device)
    if config.init == "activations":
        if init_ids is None or init_ids.numel() < config.num_virtual_tokens:
            raise ValueError(f"init 'activations' needs at least {config.num_virtual_tokens} init_ids, found "
                             f"{0 if init_ids is None else init_ids.numel()}")
        encoder.prompt_embeddings.data.copy_(activation_prefix(model, init_ids[: config.num_virtual_tokens]))
    for param in model.parameters():
        param.requires_grad_(False)
    _register(model, name, encoder, AdapterRecord(config=config))
    for param in encoder.parameters():
        param.requires_grad_(True)
    set_adapter(model, name)
    trainable, total = count_parameters(model)
    return PrefixReport(name, config, shape, trainable, total)


def add_prefix_tensor(model: nn.Module, name: str, prefixes: torch.Tensor, record: AdapterRecord) -> None:
    """Attach fixed prefixes [T, layers·2·token_dim] (e.g. read from a file) as adapter `name` (not activated)."""
    _check_new_name(model, name)
    shape = PrefixShape.of_model(model)
    config = PrefixConfig(num_virtual_tokens=prefixes.shape[0])
    encoder = PrefixEncoder(shape, config, prefixes.dtype, prefixes.device)
    encoder.prompt_embeddings = nn.Parameter(prefixes.detach().clone(), requires_grad=False)
    _register(model, name, encoder, record)


def prefix_values(model: nn.Module, name: str) -> torch.Tensor:
    """Adapter `name`'s prefixes [T, layers·2·token_dim] as they are now (through the projection if any)."""
    store = prefix_store(model)
    if name not in store:
        raise KeyError(f"no prefix adapter named {name!r}; prefix adapters: {list(store._modules) or 'none'}")
    return store[name]()


def is_prefix_adapter(model: nn.Module, name: str) -> bool:
    store = getattr(model, PREFIX_STORE, None)
    return store is not None and name in store


def _check_new_name(model: nn.Module, name: str) -> None:
    check_adapter_name(name)
    if name in registry(model).adapters:
        raise ValueError(f"adapter {name!r} already exists; delete_adapter(model, {name!r}) first or pick another name")


def _register(model: nn.Module, name: str, encoder: PrefixEncoder, record: AdapterRecord) -> None:
    prefix_store(model)[name] = encoder
    registry(model).adapters[name] = record


@torch.no_grad()
def activation_prefix(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The base model's own keys (RoPE applied, at positions 0..T-1) and values of `input_ids` [T], in
    PEFT's flat layout [T, layers·2·token_dim]: a prefix that starts out as that real prompt would."""
    decoder = model.base_model
    with disable_adapters(model), prefix_rows(model, None):
        cache = decoder(input_ids=input_ids.reshape(1, -1).to(decoder.device), use_cache=True).past_key_values
    keys_values = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers])
    return join_prefix(keys_values.float())


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
    active = registry(model).active
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
    cache = kwargs.get("past_key_values")
    past = cache.get_seq_length() if cache is not None else 0
    return torch.arange(past, past + seq_len, device=device).expand(batch_size, -1)


def _use_prefix_attention(model: nn.Module) -> None:
    """Route the model's attention through the prefix functions (kept when the user switches sdpa/eager)."""
    current = model.config._attn_implementation or "sdpa"
    if current in PREFIX_ATTENTION.values():
        return
    if current not in PREFIX_ATTENTION:
        raise ValueError(f"prefix-tuning works with attention 'sdpa' or 'eager', but the model uses {current!r}; "
                         "call model.set_attn_implementation('sdpa')")
    model.set_attn_implementation(PREFIX_ATTENTION[current])


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
    if inner_name == "sdpa":
        return sdpa_attention_forward
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise ValueError(f"{type(module).__name__} has no eager_attention_forward; use attention 'sdpa'")
    return eager


for _inner, _name in PREFIX_ATTENTION.items():
    AttentionInterface.register(_name, _prefixed(_inner))
    AttentionMaskInterface.register(_name, sdpa_mask if _inner == "sdpa" else eager_mask)
