"""The LoRA kind's serving form: its adapters in numbered slots of RoutedLinear and RoutedEmbedding layers.

Everything a LORA file may hold is written into the slots as LoRA-shaped entries (A, B, scaling, and for DoRA
a gain), so one batched computation serves them all, per row, next to each other:

    LoRA on a linear layer    (A [r, in], B [out, r], s)
    DoRA                      (A, B, s) and g = m / ‖W + s·B·A‖_row, computed here once (W is frozen)
    LoRA on the embedding     (A [r, vocab], B [dim, r], s) in the RoutedEmbedding
    trainable token rows      the embedding: (one-hot(indices) [n, vocab], (V − E[indices])ᵀ [dim, n], 1);
                              a tied head:   (V − E[indices] [n, dim], one-hot(indices)ᵀ [vocab, n], 1)

(the token entries add exactly the change from E's rows to V, so row indices[j] of the embedding, and
column indices[j] of a tied head's logits, are those of V[j]).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from deltaw.adapters.kinds import Route, SlotStore
from deltaw.adapters.lora.dora import frozen_gain
from deltaw.adapters.lora.files import LoRAPlan
from deltaw.adapters.lora.inject import adapter_layers
from deltaw.adapters.lora.fused import SHARED_INPUTS
from deltaw.adapters.lora.routed import RoutedLinear, Routing
from deltaw.adapters.lora.routed_group import group_siblings
from deltaw.adapters.lora.routed_embedding import RoutedEmbedding
from deltaw.adapters.targets import input_embedding, linear_modules, output_head


@dataclass
class SlotEntry:
    """One module's part of an adapter as the routed layers store it: A [r, in], B [out, r], scaling, DoRA's
    gain g [out] (None for LoRA)."""

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scaling: float
    gain: torch.Tensor | None = None


class LoRASlots(SlotStore):
    """Served LoRA adapters: every linear layer becomes a RoutedLinear, and the input embedding a
    RoutedEmbedding, whose stacked buffers hold one adapter per slot (zero-padded to the largest rank;
    zeros where an adapter skips the layer).

    Every layer with buffers holds `capacity` slots, grown geometrically up to `max_slots`, so loading
    n adapters copies O(n) slots.
    """

    def __init__(self, model: nn.Module, max_slots: int) -> None:
        self.max_slots, self.capacity = max_slots, 0
        self.routing = Routing()
        self.layers: dict[str, RoutedLinear | RoutedEmbedding] = _wrap_linears(model, self.routing)
        embedding = _wrap_embedding(model, self.routing)
        if embedding is not None:
            self.layers[embedding[0]] = embedding[1]
        head = output_head(model)
        tied = embedding is not None and head in self.layers and self.layers[head].weight is embedding[1].weight
        self.tied_head = head if tied else None

    def write(self, slot: int, planned: LoRAPlan) -> None:
        if slot >= self.capacity:
            self.capacity = min(self.max_slots, max(slot + 1, 2 * self.capacity))
        entries = self.entries(planned)
        unserved = sorted(set(entries) - set(self.layers))
        if unserved:
            raise ValueError(f"{planned.adapter.path}: adapts {unserved[0]!r}, which the bank does not route per row "
                             "(it routes linear layers and the input embedding); merge the adapter instead")
        for module, routed in self.layers.items():
            entry = entries.get(module)
            if entry is not None:
                routed.reserve(self.capacity, entry.lora_a.shape[0])
                gain = {} if entry.gain is None else {"gain": entry.gain}
                routed.write_slot(slot, entry.lora_a, entry.lora_b, entry.scaling, **gain)
            elif routed.scaling is not None:
                routed.reserve(self.capacity, 0)
                routed.clear_slot(slot)
        self.routing.invalidate()

    def entries(self, planned: LoRAPlan) -> dict[str, SlotEntry]:
        """The adapter's slot entry per routed module (see the module docstring)."""
        entries = {}
        for layer in planned.layers:
            gain = None
            if layer.magnitude is not None and layer.module in self.layers:
                gain = frozen_gain(self.layers[layer.module].weight, layer.lora_a, layer.lora_b, layer.scaling,
                                   layer.magnitude)
            entries[layer.module] = SlotEntry(layer.lora_a, layer.lora_b, layer.scaling, gain)
        for tokens in planned.tokens:
            weight = self.layers[tokens.module].weight
            indices = torch.tensor(tokens.indices, device=weight.device)
            change = tokens.values.float() - weight.detach()[indices].float()  # [n, dim]
            one_hot = torch.zeros(len(tokens.indices), weight.shape[0], device=weight.device)
            one_hot[torch.arange(len(tokens.indices)), indices] = 1.0
            entries[tokens.module] = SlotEntry(one_hot.to(weight.dtype), change.t().to(weight.dtype), 1.0)
            if self.tied_head is not None:
                entries[self.tied_head] = SlotEntry(change.to(weight.dtype), one_hot.t().to(weight.dtype), 1.0)
        return entries

    def clear(self, slot: int) -> None:
        for routed in self.layers.values():
            routed.clear_slot(slot)
        self.routing.invalidate()

    def route(self, routes: Sequence[Route]) -> None:
        self.routing.set(list(routes))

    def tensors(self) -> list[torch.Tensor]:
        buffers = ("lora_a", "lora_bt", "lora_at", "gain_shift")
        return [t for layer in self.layers.values() for name in buffers if (t := getattr(layer, name, None)) is not None]


def _wrap_linears(model: nn.Module, routing: Routing) -> dict[str, RoutedLinear | RoutedEmbedding]:
    """Replace every nn.Linear of `model` by a RoutedLinear sharing `routing`; return them by name."""
    lora = [name for name, _ in adapter_layers(model)]
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
    group_siblings(model, lambda module: isinstance(module, RoutedLinear), SHARED_INPUTS)
    return layers


def _wrap_embedding(model: nn.Module, routing: Routing) -> tuple[str, RoutedEmbedding] | None:
    """Replace the input embedding (a plain nn.Embedding) by a RoutedEmbedding sharing `routing`."""
    name = input_embedding(model)
    module = model.get_submodule(name) if name else None
    if not isinstance(module, nn.Embedding) or isinstance(module, RoutedEmbedding):
        return None
    routed = RoutedEmbedding(module, routing)
    model.set_submodule(name, routed)
    return name, routed
