"""A prefix adapter's parameters: the prefixes themselves, or PEFT's reparameterizing MLP; adding one to a model."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from deltaw import compat
from deltaw.adapters.manage import disable_adapters, set_adapter
from deltaw.adapters.prefix.attention import PREFIX_STORE, prefix_rows, prefix_store
from deltaw.adapters.prefix.config import PrefixConfig
from deltaw.adapters.prefix.layout import PrefixShape, join_prefix
from deltaw.adapters.state import AdapterRecord, adapters_of, check_new_name, count_parameters


class PrefixEncoder(nn.Module):
    """One prefix adapter's trainable parameters; forward() gives its prefixes [T, layers·2·token_dim].

    Direct: `prompt_embeddings` [T, width] are the prefixes, N(0, 1) at first (as PEFT's nn.Embedding).
    Reparameterized (config.projection), PEFT's prefix_projection MLP with an equalized learning rate:

        embedding [T, token_dim] -> Linear(token_dim, hidden) -> Tanh -> Linear(hidden, width) -> [T, width]
        each Linear is  x · (weight / sqrt(fan_in))ᵀ + bias,  weight ~ U(-1, 1), bias ~ U(±1/sqrt(fan_in))

    so the MLP starts exactly as nn.Linear's init (PEFT's), but the 1/sqrt(fan_in) is a constant of the
    forward, not part of the weight (the "equalized learning rate" of Karras et al., 2018). Why: AdamW moves
    every weight by about lr a step whatever its gradient's size, and a prefix value sums 512 hidden
    units, so with nn.Linear's weights one step at lr 1e-3 moves the prefixes by ~53·lr (RMS) on the
    bundled model, 5x the step that trains the direct prefixes well (lr 1e-2), and training blows up
    (loss spikes, then a prefix that ignores the input). Equalized, a step moves them by ~3·lr.
    PEFT's own loop hides the problem only when nothing clips its first gradient (norm ~100, later ~1):
    AdamW's second moment then remembers it and shrinks every later step; clipping to 1.0 (deltaw's
    default, and HF Trainer's) removes that accident. The MLP runs in its parameters' dtype (fp32 in
    training), outside autocast, so training sees the prefixes that are saved.
    """

    def __init__(self, shape: PrefixShape, config: PrefixConfig, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.shape, self.config = shape, config
        tokens, hidden = config.num_virtual_tokens, config.projection_hidden if config.projection else None

        def parameter(*size: int, bound: float | None = None) -> nn.Parameter:
            values = torch.randn(size) if bound is None else torch.empty(size).uniform_(-bound, bound)
            return nn.Parameter(values.to(dtype=dtype, device=device))

        if hidden is None:
            self.prompt_embeddings = parameter(tokens, shape.width)
            return
        # plain parameters, not nn.Linear: the model's linear layers stay exactly the base model's
        self.embedding = parameter(tokens, shape.token_dim)
        self.hidden_weight_unit = parameter(hidden, shape.token_dim, bound=1.0)
        self.hidden_bias = parameter(hidden, bound=shape.token_dim**-0.5)
        self.output_weight_unit = parameter(shape.width, hidden, bound=1.0)
        self.output_bias = parameter(shape.width, bound=hidden**-0.5)

    @property
    def num_virtual_tokens(self) -> int:
        return self.config.num_virtual_tokens

    def forward(self) -> torch.Tensor:
        """The prefixes [T, layers·2·token_dim]."""
        if not self.config.projection:
            return self.prompt_embeddings
        with torch.autocast(self.embedding.device.type, enabled=False):
            hidden = torch.tanh(equalized_linear(self.embedding, self.hidden_weight_unit, self.hidden_bias))
            return equalized_linear(hidden, self.output_weight_unit, self.output_bias)


def equalized_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x · (weight / sqrt(fan_in))ᵀ + bias. x: [T, fan_in]; weight: [out, fan_in]; bias: [out] -> [T, out]."""
    return F.linear(x, weight * weight.shape[1] ** -0.5, bias)


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
        projection = f", through an MLP of hidden size {cfg.projection_hidden}" if cfg.projection else ""
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
        init_ids: [T'] token ids (T' >= T, e.g. the first training tokens) whose first T keys and values
            start the prefix when the init is "activations" (the default when they are given).
    """
    check_new_name(model, name)
    tokens = config.num_virtual_tokens
    config = replace(config, init=config.resolved_init(init_ids is not None and init_ids.numel() >= tokens))
    shape = PrefixShape.of_model(model)
    device = next(model.parameters()).device
    encoder = PrefixEncoder(shape, config, dtype, device)
    if config.init == "activations":
        if init_ids is None or init_ids.numel() < config.num_virtual_tokens:
            raise ValueError(f"init 'activations' starts the prefix from {config.num_virtual_tokens} real tokens "
                             f"(the first of the training data), but {0 if init_ids is None else init_ids.numel()} "
                             "were given; use init 'random' (--prefix-init random) or fewer --num-virtual-tokens")
        encoder.prompt_embeddings.data.copy_(activation_prefix(model, init_ids[: config.num_virtual_tokens]))
    for param in model.parameters():
        param.requires_grad_(False)
    _register(model, name, encoder, AdapterRecord(kind="prefix", config=config))
    for param in encoder.parameters():
        param.requires_grad_(True)
    set_adapter(model, name)
    trainable, total = count_parameters(model)
    return PrefixReport(name, config, shape, trainable, total)


def add_prefix_tensor(model: nn.Module, name: str, prefixes: torch.Tensor, record: AdapterRecord) -> None:
    """Attach fixed prefixes [T, layers·2·token_dim] (e.g. read from a file) as adapter `name` (not activated)."""
    check_new_name(model, name)
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


def _register(model: nn.Module, name: str, encoder: PrefixEncoder, record: AdapterRecord) -> None:
    prefix_store(model)[name] = encoder
    adapters_of(model).adapters[name] = record


@torch.no_grad()
def activation_prefix(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The base model's own keys (RoPE applied, at positions 0..T-1) and values of `input_ids` [T], in
    PEFT's flat layout [T, layers·2·token_dim]: a prefix that starts out as that real prompt would."""
    decoder = compat.decoder(model)
    with disable_adapters(model), prefix_rows(model, None):
        output = decoder(input_ids=input_ids.reshape(1, -1).to(decoder.device), use_cache=True)
    cache = compat.find_cache(output.values())
    keys_values = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in compat.cache_layers(cache)])
    return join_prefix(keys_values.float())
