"""Many adapters on one base model: add, switch, disable, delete, merge and unmerge.

The model's adapters live in its LoRALinear layers; the model-level record (each adapter's config and
metadata, which one is active) is kept in one small registry object attached to the model. Every
function that takes an adapter name raises on an unknown name: nothing falls back to the base model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from deltaw.config import LoRAConfig, PrefixConfig
from deltaw.lora import LoRALinear, check_adapter_name, init_lora_weights
from deltaw.nf4 import NF4Weight
from deltaw.nf4_linear import NF4Linear
from deltaw.targets import Selection, select_modules

_REGISTRY_ATTR = "_deltaw_registry"
PREFIX_STORE = "deltaw_prefixes"  # the submodule holding prefix adapters (deltaw.prefix)


@dataclass
class AdapterRecord:
    """What the model knows of one adapter beyond its tensors.

    Attributes:
        config: the LoRA hyper-parameters (targets as given or as read from a file), or a prefix
            adapter's PrefixConfig.
        metadata: extra facts carried to and from adapter_config.json (e.g. a training record).
    """

    config: LoRAConfig | PrefixConfig
    metadata: dict = field(default_factory=dict)


@dataclass
class Registry:
    """The adapters of one model, in the order they were added, and the active one."""

    adapters: dict[str, AdapterRecord] = field(default_factory=dict)
    active: str | None = None


def registry(model: nn.Module) -> Registry:
    """The model's adapter registry (created empty on first use)."""
    reg = model.__dict__.get(_REGISTRY_ATTR)
    if reg is None:
        reg = Registry()
        model.__dict__[_REGISTRY_ATTR] = reg
    return reg


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """Every LoRALinear in the model with its dotted name."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def require_adapter(model: nn.Module, name: str) -> AdapterRecord:
    """The record of adapter `name`, or a KeyError listing the loaded adapters."""
    reg = registry(model)
    if name not in reg.adapters:
        raise KeyError(f"no adapter named {name!r}; loaded adapters: {list(reg.adapters) or 'none'}")
    return reg.adapters[name]


@dataclass(frozen=True)
class LoRAReport:
    """What add_lora did: modules per pattern and parameter counts."""

    name: str
    config: LoRAConfig
    selection: Selection
    trainable: int
    total: int

    def __str__(self) -> str:
        cfg = self.config
        lines = [
            f"adapter {self.name!r}: rank {cfg.rank}, alpha {cfg.alpha:g} (scaling {cfg.scaling:g}), "
            f"{len(self.selection.modules)} modules"
        ]
        for pattern, names in self.selection.per_pattern.items():
            lines.append(f"  {pattern:<40} {len(names):>5} modules")
        lines.append(f"trainable {self.trainable:,} / {self.total:,} ({100 * self.trainable / self.total:.2f}%)")
        return "\n".join(lines)


def wrap_linear(model: nn.Module, module_name: str) -> LoRALinear:
    """Replace the nn.Linear (or NF4Linear) at `module_name` by a LoRALinear holding the same weight and bias."""
    module = model.get_submodule(module_name)
    if isinstance(module, LoRALinear):
        return module
    if not isinstance(module, (nn.Linear, NF4Linear)):
        raise TypeError(f"{module_name!r} is a {type(module).__name__}, not nn.Linear")
    layer = LoRALinear(module)
    model.set_submodule(module_name, layer)
    return layer


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared tensor counted once; NF4 weights count as parameters."""
    params = list(model.parameters())
    quantized = sum(module.numel() for module in model.modules() if isinstance(module, NF4Weight))
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params) + quantized


def add_lora(
    model: nn.Module,
    config: LoRAConfig,
    name: str = "default",
    dtype: torch.dtype | None = None,
) -> LoRAReport:
    """Add a fresh LoRA adapter `name` to `model`, make it active and the only trainable parameters.

    A is random (config.init), B is zero, so the model's output is unchanged until training.
    Adapter weights take the dtype of each base weight unless `dtype` is given (e.g. float32
    adapters on a bf16 base for training). Returns a report; print it to see the counts.
    """
    check_adapter_name(name)
    reg = registry(model)
    if name in reg.adapters:
        raise ValueError(f"adapter {name!r} already exists; delete_adapter(model, {name!r}) first or pick another name")
    merged = merged_adapter(model)
    if merged is not None:
        raise RuntimeError(f"adapter {merged!r} is merged; call unmerge_adapter(model) before adding an adapter")
    selection = select_modules(model, config.targets, config.exclude)
    for param in model.parameters():
        param.requires_grad_(False)
    for module_name in selection.modules:
        layer = wrap_linear(model, module_name)
        lora_a, lora_b = init_lora_weights(
            layer.in_features, layer.out_features, config.rank, config.init,
            dtype or layer.weight.dtype, layer.weight.device,
        )
        layer.add_adapter(name, lora_a, lora_b, config.scaling, config.dropout)
        layer.lora_A[name].requires_grad_(True)
        layer.lora_B[name].requires_grad_(True)
    reg.adapters[name] = AdapterRecord(config=config)
    set_adapter(model, name)
    trainable, total = count_parameters(model)
    return LoRAReport(name=name, config=config, selection=selection, trainable=trainable, total=total)


def list_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters on `model`, in the order they were added."""
    return list(registry(model).adapters)


def active_adapter(model: nn.Module) -> str | None:
    """The adapter the model's forward uses, or None for the base model."""
    return registry(model).active


def merged_adapter(model: nn.Module) -> str | None:
    """The adapter currently merged into the weights, or None."""
    return next((layer.merged for _, layer in lora_layers(model) if layer.merged), None)


def set_adapter(model: nn.Module, name: str) -> None:
    """Make adapter `name` the one the forward pass adds (unmerged)."""
    require_adapter(model, name)
    merged = merged_adapter(model)
    if merged is not None and merged != name:
        raise RuntimeError(
            f"adapter {merged!r} is merged into the weights; call merge_adapter(model, {name!r}) to switch "
            "by merging, or unmerge_adapter(model) first"
        )
    for _, layer in lora_layers(model):
        layer.active = name if name in layer.lora_A else None
    registry(model).active = name


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` and its tensors from the model."""
    require_adapter(model, name)
    if merged_adapter(model) == name:
        raise RuntimeError(f"adapter {name!r} is merged; call unmerge_adapter(model) before deleting it")
    for _, layer in lora_layers(model):
        if name in layer.lora_A:
            layer.delete_adapter(name)
    prefixes = getattr(model, PREFIX_STORE, None)
    if prefixes is not None and name in prefixes:
        del prefixes[name]
    reg = registry(model)
    del reg.adapters[name]
    if reg.active == name:
        reg.active = None


def deactivate_adapters(model: nn.Module) -> None:
    """Make the model compute the base output until the next set_adapter (loaded adapters stay)."""
    merged = merged_adapter(model)
    if merged is not None:
        raise RuntimeError(
            f"adapter {merged!r} is merged into the weights, so the base output is not available; "
            "call unmerge_adapter(model) first"
        )
    for _, layer in lora_layers(model):
        layer.active = None
    registry(model).active = None


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Within the block the model computes the base output; the active adapter is restored after."""
    layers = [layer for _, layer in lora_layers(model)]
    saved = [layer.active for layer in layers]
    saved_active = registry(model).active
    deactivate_adapters(model)
    try:
        yield
    finally:
        for layer, active in zip(layers, saved):
            layer.active = active
        registry(model).active = saved_active


def merge_adapter(model: nn.Module, name: str) -> None:
    """Merge adapter `name` into the weights: W <- W + scaling·B·A in every layer it adapts.

    If another adapter is merged it is replaced (never stacked): each layer starts again from its
    kept unmerged weight, so the result equals a fresh merge of `name` bit for bit.
    """
    if isinstance(require_adapter(model, name).config, PrefixConfig):
        raise ValueError(f"adapter {name!r} is a prefix adapter: it adds keys and values to attention and has no "
                         "weight change to merge; use it unmerged with set_adapter(model, name)")
    for _, layer in lora_layers(model):
        if name in layer.lora_A:
            layer.merge_(name)
        else:
            layer.unmerge_()
            layer.active = None
    registry(model).active = name


def unmerge_adapter(model: nn.Module, release_memory: bool = False) -> str | None:
    """Restore the base weights bit for bit; the adapter stays active, unmerged. Returns its name.

    Each merged layer keeps its copy of the base weight for the next merge (a copy of every merged
    weight); `release_memory=True` frees it.
    """
    name = merged_adapter(model)
    for _, layer in lora_layers(model):
        layer.unmerge_(release_memory=release_memory)
    return name
