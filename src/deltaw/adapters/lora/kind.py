"""The LoRA kind: PEFT's peft_type "LORA", on LoRALinear layers, merged exactly, served from stacked slots."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from deltaw.adapters.kinds import AdapterKind, Route, SlotStore, register_kind
from deltaw.adapters.lora.config import LoRAConfig
from deltaw.adapters.lora.files import (
    AdapterFile,
    LoRAPlan,
    attach_lora,
    describe_lora,
    plan_load,
    read_lora_adapter,
    save_lora,
)
from deltaw.adapters.lora.inject import LoRAReport, adapter_layers, add_lora, lora_layers, merged_lora
from deltaw.adapters.lora.routed import RoutedLinear, Routing
from deltaw.adapters.state import AdapterRecord, adapters_of
from deltaw.adapters.targets import linear_modules


class LoRAKind(AdapterKind):
    """Low-rank adapters on linear layers (see deltaw.adapters.lora.layer)."""

    name = "lora"
    peft_type = "LORA"
    config_type = LoRAConfig
    label = "a LoRA adapter"
    mixable = True

    def add(self, model: nn.Module, config: LoRAConfig, name: str, dtype: torch.dtype | None = None,
            sample_ids: torch.Tensor | None = None, tokenizer: object | None = None) -> LoRAReport:
        return add_lora(model, config, name, dtype, tokenizer=tokenizer)

    def read(self, path: Path) -> AdapterFile:
        return read_lora_adapter(path)

    def plan(self, model: nn.Module, adapter: AdapterFile, ignore_fingerprint: bool = False,
             dtype: torch.dtype | None = None) -> LoRAPlan:
        return plan_load(model, adapter, ignore_fingerprint=ignore_fingerprint, dtype=dtype)

    def attach(self, model: nn.Module, name: str, planned: LoRAPlan, metadata: dict) -> AdapterRecord:
        return attach_lora(model, name, planned, metadata)

    def save(self, model: nn.Module, name: str, path: Path, metadata: dict) -> Path:
        return save_lora(model, name, path, metadata)

    def describe(self, adapter: AdapterFile) -> str:
        return describe_lora(adapter)

    def activate(self, model: nn.Module, name: str | None) -> None:
        for _, layer in adapter_layers(model):
            layer.active = name if layer.has(name) else None

    def delete(self, model: nn.Module, name: str) -> None:
        for _, layer in adapter_layers(model):
            if layer.has(name):
                layer.delete_adapter(name)

    def unload(self, model: nn.Module) -> None:
        """Replace every adapter layer by the plain layer it wrapped (nn.Linear, NF4Linear for a 4-bit base,
        nn.Embedding) holding its current weight, merged or not."""
        for module_name, layer in list(adapter_layers(model)):
            model.set_submodule(module_name, layer.unwrap())
        state = adapters_of(model)
        for name in [name for name, record in state.adapters.items() if record.kind == self.name]:
            del state.adapters[name]

    def merge(self, model: nn.Module, name: str) -> None:
        """W <- W + scaling·B·A (DoRA: its rescaled sum; token rows: replaced) in every layer `name` adapts;
        other layers return to their base weight."""
        for _, layer in adapter_layers(model):
            if layer.has(name):
                layer.merge_(name)
            else:
                layer.unmerge_()
                layer.active = None

    def merged(self, model: nn.Module) -> str | None:
        return merged_lora(model)

    def unmerge(self, model: nn.Module, release_memory: bool = False) -> None:
        for _, layer in adapter_layers(model):
            layer.unmerge_(release_memory=release_memory)

    def slot_store(self, model: nn.Module, max_slots: int) -> LoRASlots:
        return LoRASlots(model, max_slots)


class LoRASlots(SlotStore):
    """Served LoRA adapters: every linear layer becomes a RoutedLinear whose stacked buffers hold one adapter
    per slot (zero-padded to the largest rank; zeros where an adapter skips the layer).

    Every layer with buffers holds `capacity` slots, grown geometrically up to `max_slots`, so loading
    n adapters copies O(n) slots.
    """

    def __init__(self, model: nn.Module, max_slots: int) -> None:
        self.max_slots, self.capacity = max_slots, 0
        self.routing = Routing()
        self.layers = _wrap_linears(model, self.routing)

    def write(self, slot: int, planned: LoRAPlan) -> None:
        if slot >= self.capacity:
            self.capacity = min(self.max_slots, max(slot + 1, 2 * self.capacity))
        targeted = {layer.module: layer for layer in planned.layers}
        for module, routed in self.layers.items():
            if module in targeted:
                layer = targeted[module]
                routed.reserve(self.capacity, layer.lora_a.shape[0])
                routed.write_slot(slot, layer.lora_a, layer.lora_b, layer.scaling)
            elif routed.lora_a is not None:
                routed.reserve(self.capacity, 0)
                routed.clear_slot(slot)
        self.routing.invalidate()

    def clear(self, slot: int) -> None:
        for routed in self.layers.values():
            routed.clear_slot(slot)
        self.routing.invalidate()

    def route(self, routes: Sequence[Route]) -> None:
        self.routing.set(list(routes))

    def tensors(self) -> list[torch.Tensor]:
        return [t for layer in self.layers.values() for t in (layer.lora_a, layer.lora_bt) if t is not None]


def _wrap_linears(model: nn.Module, routing: Routing) -> dict[str, RoutedLinear]:
    """Replace every nn.Linear of `model` by a RoutedLinear sharing `routing`; return them by name."""
    lora = [name for name, _ in lora_layers(model)]
    if lora:
        raise ValueError(
            f"the adapter bank serves a plain base model, but {lora[0]!r} (and {len(lora) - 1} more) are LoRA "
            "layers: call deltaw.unload(model) first, and load the adapters into the bank instead"
        )
    layers = {}
    for name, module in linear_modules(model).items():
        if isinstance(module, RoutedLinear):
            raise ValueError(f"{name!r} is already routed: this model already has an AdapterBank")
        layers[name] = RoutedLinear(module, routing)
        model.set_submodule(name, layers[name])
    return layers


LORA = register_kind(LoRAKind())
