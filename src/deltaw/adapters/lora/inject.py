"""Putting LoRA into a model: wrap its linear layers in LoRALinear and add a fresh adapter."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from deltaw.adapters.lora.config import LoRAConfig
from deltaw.adapters.lora.layer import LoRALinear, init_lora_weights
from deltaw.adapters.manage import set_adapter
from deltaw.adapters.state import AdapterRecord, adapters_of, check_new_name, count_parameters
from deltaw.adapters.targets import Selection, select_modules
from deltaw.quant.linear import NF4Linear


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


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """Every LoRALinear in the model with its dotted name."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def merged_lora(model: nn.Module) -> str | None:
    """The LoRA adapter merged into the weights now, or None."""
    return next((layer.merged for _, layer in lora_layers(model) if layer.merged), None)


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


def add_lora(model: nn.Module, config: LoRAConfig, name: str = "default", dtype: torch.dtype | None = None) -> LoRAReport:
    """Add a fresh LoRA adapter `name` to `model`, make it active and the only trainable parameters.

    A is random (config.init), B is zero, so the model's output is unchanged until training.
    Adapter weights take the dtype of each base weight unless `dtype` is given (e.g. float32
    adapters on a bf16 base for training). Returns a report; print it to see the counts.
    """
    check_new_name(model, name)
    merged = merged_lora(model)
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
    adapters_of(model).adapters[name] = AdapterRecord(kind="lora", config=config)
    set_adapter(model, name)
    trainable, total = count_parameters(model)
    return LoRAReport(name=name, config=config, selection=selection, trainable=trainable, total=total)
