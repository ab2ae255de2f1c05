"""Many adapters on one base model: list, switch, disable, delete, merge and unmerge them.

These functions work for every adapter kind: each asks the adapter's kind (deltaw.adapters.kinds)
to do its part. Every function that takes an adapter name raises on an unknown name: nothing falls
back to the base model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from deltaw.adapters.kinds import all_kinds, kind_of
from deltaw.adapters.state import adapters_of, require_adapter


def list_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters on `model`, in the order they were added."""
    return list(adapters_of(model).adapters)


def active_adapter(model: nn.Module) -> str | None:
    """The adapter the model's forward uses, or None for the base model."""
    return adapters_of(model).active


def merged_adapter(model: nn.Module) -> str | None:
    """The adapter currently merged into the weights, or None."""
    return next((name for kind in all_kinds() if (name := kind.merged(model)) is not None), None)


def _activate(model: nn.Module, name: str | None) -> None:
    for kind in all_kinds():
        kind.activate(model, name)
    adapters_of(model).active = name


def set_adapter(model: nn.Module, name: str) -> None:
    """Make adapter `name` the one the forward pass adds (unmerged)."""
    require_adapter(model, name)
    merged = merged_adapter(model)
    if merged is not None and merged != name:
        raise RuntimeError(
            f"adapter {merged!r} is merged into the weights; call merge_adapter(model, {name!r}) to switch "
            "by merging, or unmerge_adapter(model) first"
        )
    _activate(model, name)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` and its tensors from the model."""
    record = require_adapter(model, name)
    if merged_adapter(model) == name:
        raise RuntimeError(f"adapter {name!r} is merged; call unmerge_adapter(model) before deleting it")
    kind_of(record).delete(model, name)
    state = adapters_of(model)
    del state.adapters[name]
    if state.active == name:
        _activate(model, None)


def deactivate_adapters(model: nn.Module) -> None:
    """Make the model compute the base output until the next set_adapter (loaded adapters stay)."""
    merged = merged_adapter(model)
    if merged is not None:
        raise RuntimeError(
            f"adapter {merged!r} is merged into the weights, so the base output is not available; "
            "call unmerge_adapter(model) first"
        )
    _activate(model, None)


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Within the block the model computes the base output; the active adapter is restored after."""
    saved = active_adapter(model)
    deactivate_adapters(model)
    try:
        yield
    finally:
        _activate(model, saved)


def merge_adapter(model: nn.Module, name: str) -> None:
    """Merge adapter `name` into the weights (for LoRA: W <- W + scaling·B·A in every layer it adapts).

    If another adapter is merged it is replaced (never stacked): each layer starts again from its
    kept unmerged weight, so the result equals a fresh merge of `name` bit for bit. Kinds that have
    no weight change (prefix-tuning) refuse with a message that says so.
    """
    kind_of(require_adapter(model, name)).merge(model, name)
    adapters_of(model).active = name


def unmerge_adapter(model: nn.Module, release_memory: bool = False) -> str | None:
    """Restore the base weights bit for bit; the adapter stays active, unmerged. Returns its name.

    Each merged layer keeps its copy of the base weight for the next merge (a copy of every merged
    weight); `release_memory=True` frees it.
    """
    name = merged_adapter(model)
    for kind in all_kinds():
        kind.unmerge(model, release_memory=release_memory)
    return name
