"""The prefix-tuning kind: PEFT's peft_type "PREFIX_TUNING", keys and values at the attention interface."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from deltaw.adapters.kinds import AdapterKind, Route, SlotStore, register_kind
from deltaw.adapters.prefix.attention import prefix_store, set_prefix_rows
from deltaw.adapters.prefix.config import PrefixConfig
from deltaw.adapters.prefix.encoder import PrefixReport, add_prefix
from deltaw.adapters.prefix.files import (
    PrefixFile,
    PrefixPlan,
    attach_prefix,
    describe_prefix_adapter,
    plan_prefix,
    read_prefix_adapter,
    save_prefix_adapter,
)
from deltaw.adapters.state import AdapterRecord


class PrefixKind(AdapterKind):
    """Trainable keys and values prepended at every attention layer (see deltaw.adapters.prefix.attention)."""

    name = "prefix"
    peft_type = "PREFIX_TUNING"
    config_type = PrefixConfig
    label = "a prefix adapter"
    mixable = False  # prefixes add attention columns; a weighted sum of two prefixes means nothing

    def add(self, model: nn.Module, config: PrefixConfig, name: str, dtype: torch.dtype | None = None,
            sample_ids: torch.Tensor | None = None, tokenizer: object | None = None) -> PrefixReport:
        return add_prefix(model, config, name, dtype=dtype or torch.float32, init_ids=sample_ids)

    def read(self, path: Path) -> PrefixFile:
        return read_prefix_adapter(path)

    def plan(self, model: nn.Module, adapter: PrefixFile, ignore_fingerprint: bool = False,
             dtype: torch.dtype | None = None) -> PrefixPlan:
        return plan_prefix(model, adapter, ignore_fingerprint, dtype)

    def attach(self, model: nn.Module, name: str, planned: PrefixPlan, metadata: dict) -> AdapterRecord:
        return attach_prefix(model, name, planned, metadata)

    def save(self, model: nn.Module, name: str, path: Path, metadata: dict) -> Path:
        return save_prefix_adapter(model, name, path, metadata)

    def describe(self, adapter: PrefixFile) -> str:
        return describe_prefix_adapter(adapter)

    def delete(self, model: nn.Module, name: str) -> None:
        del prefix_store(model)[name]

    def slot_store(self, model: nn.Module, max_slots: int) -> PrefixSlots:
        return PrefixSlots(model)


class PrefixSlots(SlotStore):
    """Served prefix adapters: their prefixes [T, layers·2·token_dim] by slot (0.9 MB for 20 tokens on the
    bundled model); before each forward every row gets its own (set_prefix_rows), so prefix, LoRA and
    base rows share one batch."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.prefixes: dict[int, torch.Tensor] = {}
        prefix_store(model)  # installs the attention hook that serves per-row prefixes

    def write(self, slot: int, planned: PrefixPlan) -> None:
        self.prefixes[slot] = planned.prefixes

    def clear(self, slot: int) -> None:
        self.prefixes.pop(slot, None)

    def route(self, routes: Sequence[Route]) -> None:
        rows = []
        for route in routes:
            if len(route) > 1 or (route and route[0][1] != 1.0):
                raise ValueError("a prefix adapter cannot be part of a weighted mix; request it alone")
            rows.append(self.prefixes[route[0][0]] if route else None)
        set_prefix_rows(self.model, rows)

    def tensors(self) -> list[torch.Tensor]:
        return list(self.prefixes.values())


PREFIX = register_kind(PrefixKind())
