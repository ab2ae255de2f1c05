"""The LoRA kind: PEFT's peft_type "LORA" (with DoRA, embedding LoRA and trainable tokens), on LoRALinear and
LoRAEmbedding layers, merged exactly, served from stacked slots (slots.py)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from deltaw.adapters.kinds import AdapterKind, register_kind
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
from deltaw.adapters.lora.gguf import GGUFAdapterFile, describe_gguf, is_gguf, read_gguf_adapter
from deltaw.adapters.lora.inject import LoRAReport, adapter_layers, add_lora, merged_lora
from deltaw.adapters.lora.slots import LoRASlots
from deltaw.adapters.state import AdapterRecord, adapters_of


class LoRAKind(AdapterKind):
    """Low-rank adapters on linear layers (see deltaw.adapters.lora.layer)."""

    name = "lora"
    peft_type = "LORA"
    config_type = LoRAConfig
    label = "a LoRA adapter"
    mixable = True
    file_suffixes = (".gguf",)  # llama.cpp's LoRA adapters (deltaw.adapters.lora.gguf)

    def add(self, model: nn.Module, config: LoRAConfig, name: str, dtype: torch.dtype | None = None,
            sample_ids: torch.Tensor | None = None, tokenizer: object | None = None) -> LoRAReport:
        return add_lora(model, config, name, dtype, tokenizer=tokenizer)

    def read(self, path: Path) -> AdapterFile:
        return read_gguf_adapter(path) if is_gguf(path) else read_lora_adapter(path)

    def plan(self, model: nn.Module, adapter: AdapterFile, ignore_fingerprint: bool = False,
             dtype: torch.dtype | None = None) -> LoRAPlan:
        if isinstance(adapter, GGUFAdapterFile):
            adapter = adapter.for_model(model)  # q/k rows back in the model's order
        return plan_load(model, adapter, ignore_fingerprint=ignore_fingerprint, dtype=dtype)

    def attach(self, model: nn.Module, name: str, planned: LoRAPlan, metadata: dict) -> AdapterRecord:
        return attach_lora(model, name, planned, metadata)

    def save(self, model: nn.Module, name: str, path: Path, metadata: dict) -> Path:
        return save_lora(model, name, path, metadata)

    def describe(self, adapter: AdapterFile) -> str:
        return describe_gguf(adapter) if isinstance(adapter, GGUFAdapterFile) else describe_lora(adapter)

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


LORA = register_kind(LoRAKind())
