"""What a model knows of its adapters beyond their tensors: one record per adapter, and the active one.

The records live in one small object attached to the model (`adapters_of(model)`); the tensors live
in the modules each adapter kind adds (LoRA layers, the prefix store). Every lookup by name raises on
an unknown name: nothing falls back to the base model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from deltaw.quant.nf4 import NF4Weight

ADAPTER_NAME = re.compile(r"[A-Za-z0-9_\-]{1,64}")
_STATE_ATTR = "_deltaw_registry"


def check_adapter_name(name: str) -> None:
    """Raise ValueError unless `name` is 1-64 letters, digits, '_' or '-' (no dots: names are keys)."""
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
        raise ValueError(f"invalid adapter name {name!r}: use 1-64 letters, digits, '_' or '-' (e.g. 'pirate')")


@dataclass
class AdapterRecord:
    """What the model knows of one adapter beyond its tensors.

    Attributes:
        kind: the adapter kind's name ("lora", "prefix", ...; see deltaw.adapters.kinds).
        config: the kind's config object (LoRAConfig, PrefixConfig, ...).
        metadata: extra facts carried to and from adapter_config.json (e.g. a training record).
    """

    kind: str
    config: Any
    metadata: dict = field(default_factory=dict)


@dataclass
class ModelAdapters:
    """The adapters of one model, in the order they were added, and the active one."""

    adapters: dict[str, AdapterRecord] = field(default_factory=dict)
    active: str | None = None


def adapters_of(model: nn.Module) -> ModelAdapters:
    """The model's adapter records (created empty on first use)."""
    state = model.__dict__.get(_STATE_ATTR)
    if state is None:
        state = model.__dict__[_STATE_ATTR] = ModelAdapters()
    return state


def require_adapter(model: nn.Module, name: str) -> AdapterRecord:
    """The record of adapter `name`, or a KeyError listing the loaded adapters."""
    state = adapters_of(model)
    if name not in state.adapters:
        raise KeyError(f"no adapter named {name!r}; loaded adapters: {list(state.adapters) or 'none'}")
    return state.adapters[name]


def check_new_name(model: nn.Module, name: str) -> None:
    """Raise ValueError unless `name` is a valid name that no adapter of `model` has yet."""
    check_adapter_name(name)
    if name in adapters_of(model).adapters:
        raise ValueError(f"adapter {name!r} already exists; delete_adapter(model, {name!r}) first or pick another name")


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared tensor counted once; NF4 weights count as parameters."""
    params = list(model.parameters())
    quantized = sum(module.numel() for module in model.modules() if isinstance(module, NF4Weight))
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params) + quantized
