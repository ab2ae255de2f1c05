"""The one seam for adapter kinds: each kind (LoRA, prefix-tuning, ...) is one `AdapterKind` registered here.

    adapter_config.json ──peft_type──► kind_for_config ─► kind.read ─► kind.plan(model) ─► kind.attach
    record.kind ─────────────────────► kind_named       ─► save / describe / merge / delete / activate
    serving: kind.slot_store(model) ─► a store of the kind's adapters in numbered slots, routed per row

A kind owns everything that differs between kinds: its config class, how it is injected into a model,
its files (reading, checking against a model, writing, describing), whether and how it merges, and its
serving form (the slot store the adapter bank writes it into and routes rows through). Everything
else (adapter names, the active adapter, the bank's slots, LRU and reference counts, the training
loop, the HTTP server) is written once and asks the kind. Adding a kind is one module plus a
`register_kind` call.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import nn

from deltaw.adapters.files import AdapterFormatError
from deltaw.adapters.state import AdapterRecord, adapters_of

Route = tuple[tuple[int, float], ...]
"""A served row's adapters: ((slot, weight), ...); () is the base model."""


class AdapterKind(ABC):
    """One kind of adapter. Subclasses set the class attributes and implement the methods.

    Attributes:
        name: deltaw's name of the kind ("lora", "prefix"); stored in AdapterRecord.kind.
        peft_type: PEFT's `peft_type` in adapter_config.json ("LORA", "PREFIX_TUNING").
        config_type: the kind's config dataclass.
        label: how messages name an adapter of this kind ("a LoRA adapter").
        mixable: whether served requests may combine it with others in a weighted mix.
        file_suffixes: single-file formats the kind also reads, besides PEFT's directory (LoRA: ".gguf",
            llama.cpp's adapters); `read(path)` gets such a file's path.
    """

    name: ClassVar[str]
    peft_type: ClassVar[str]
    config_type: ClassVar[type]
    label: ClassVar[str]
    mixable: ClassVar[bool] = False
    file_suffixes: ClassVar[tuple[str, ...]] = ()

    # ----------------------------------------------------------------------------- choosing
    def claims(self, peft_config: dict) -> bool:
        """Whether this kind reads an adapter_config.json with these keys (by default: its peft_type)."""
        return peft_config.get("peft_type") == self.peft_type

    # ----------------------------------------------------------------------------- a model's adapters
    @abstractmethod
    def add(self, model: nn.Module, config: Any, name: str, dtype: torch.dtype | None = None,
            sample_ids: torch.Tensor | None = None, tokenizer: object | None = None) -> object:
        """Add a fresh, trainable adapter `name` built from `config`, make it active; return a printable report.

        `sample_ids` [T] are the first tokens of the training data, for kinds whose init uses data;
        `tokenizer` is the model's, for kinds whose config names tokens (LoRA's trainable tokens).
        """

    @abstractmethod
    def read(self, path: Path) -> Any:
        """Read and check an adapter directory (or a file with one of `file_suffixes`) of this kind on its own
        (no model needed)."""

    @abstractmethod
    def plan(self, model: nn.Module, adapter: Any, ignore_fingerprint: bool = False,
             dtype: torch.dtype | None = None) -> Any:
        """Check `adapter` (from `read`) against `model` and return what `attach` and slot stores need.
        Raises AdapterFormatError; never changes the model."""

    @abstractmethod
    def attach(self, model: nn.Module, name: str, planned: Any, metadata: dict) -> AdapterRecord:
        """Attach a planned adapter to `model` as `name` (not activated)."""

    @abstractmethod
    def save(self, model: nn.Module, name: str, path: Path, metadata: dict) -> Path:
        """Write adapter `name` to directory `path` in PEFT's layout; `metadata` joins its "deltaw" section."""

    @abstractmethod
    def describe(self, adapter: Any) -> str:
        """A human-readable summary of an adapter from `read`."""

    def activate(self, model: nn.Module, name: str | None) -> None:
        """Make `name` (which may be another kind's adapter, or None) the adapter the forward pass uses."""

    @abstractmethod
    def delete(self, model: nn.Module, name: str) -> None:
        """Remove adapter `name`'s tensors from the model (its record is removed by the caller)."""

    def unload(self, model: nn.Module) -> None:
        """Remove every adapter of this kind from `model`, keeping a merged one's weights (the model then holds
        no trace of the kind). By default, `delete` each of them."""
        for name, record in list(adapters_of(model).adapters.items()):
            if record.kind == self.name:
                self.delete(model, name)
                del adapters_of(model).adapters[name]

    # ----------------------------------------------------------------------------- merging
    def merge(self, model: nn.Module, name: str) -> None:
        """Fold adapter `name` into the base weights; kinds that cannot merge say why."""
        raise ValueError(f"adapter {name!r} is {self.label}, which has no weight change to merge; use it unmerged "
                         "with set_adapter(model, name)")

    def merged(self, model: nn.Module) -> str | None:
        """The adapter of this kind merged into the weights now, or None."""
        return None

    def unmerge(self, model: nn.Module, release_memory: bool = False) -> None:
        """Restore the base weights bit for bit (a no-op for kinds that never merge)."""

    # ----------------------------------------------------------------------------- serving
    @abstractmethod
    def slot_store(self, model: nn.Module, max_slots: int) -> SlotStore:
        """The store in which the adapter bank keeps this kind's served adapters, in at most `max_slots` slots."""


class SlotStore(ABC):
    """A kind's serving form: its adapters in numbered slots on one model, routed per batch row.

    The adapter bank (deltaw.serve.bank) owns the slot numbers, their LRU order and reference counts,
    and writes each adapter into the store of its kind. Before every forward pass it gives each store
    the rows' routes restricted to that store's slots, and the store makes the model compute, for row
    i, the base model plus Σ weight·(adapter in slot) over `routes[i]` (() is the base model).
    """

    @abstractmethod
    def write(self, slot: int, planned: Any) -> None:
        """Store a planned adapter (from the kind's `plan`) in `slot`."""

    def clear(self, slot: int) -> None:
        """Forget whatever `slot` holds in this store (another kind's adapter takes it)."""

    @abstractmethod
    def route(self, routes: Sequence[Route]) -> None:
        """Route row i of the next forward passes to `routes[i]`: ((slot, weight), ...) of this store."""

    def tensors(self) -> list[torch.Tensor]:
        """The tensors holding the store's adapters (for memory accounting)."""
        return []


_KINDS: dict[str, AdapterKind] = {}


def register_kind(kind: AdapterKind) -> AdapterKind:
    """Make `kind` known to every generic function (load_adapter, the bank, training, ...)."""
    if kind.name in _KINDS:
        raise ValueError(f"an adapter kind named {kind.name!r} is already registered")
    _KINDS[kind.name] = kind
    return kind


def all_kinds() -> Iterator[AdapterKind]:
    """Every registered kind, in registration order."""
    return iter(list(_KINDS.values()))


def kind_named(name: str) -> AdapterKind:
    """The registered kind called `name` (AdapterRecord.kind)."""
    if name not in _KINDS:
        raise KeyError(f"no adapter kind {name!r}; known kinds: {sorted(_KINDS)}")
    return _KINDS[name]


def kind_of(record: AdapterRecord) -> AdapterKind:
    """The kind of an adapter the model holds."""
    return kind_named(record.kind)


def kind_for_config(config: Any) -> AdapterKind:
    """The kind whose config class `config` is an instance of (e.g. LoRAConfig -> the LoRA kind)."""
    for kind in _KINDS.values():
        if isinstance(config, kind.config_type):
            return kind
    raise TypeError(f"{type(config).__name__} is not the config of an adapter kind; use one of "
                    f"{[kind.config_type.__name__ for kind in _KINDS.values()]}")


def kind_for_peft(peft_config: dict, where: str | os.PathLike) -> AdapterKind:
    """The kind that reads an adapter_config.json with these keys, or an AdapterFormatError naming the file."""
    claimed = [kind for kind in _KINDS.values() if kind.claims(peft_config)]
    if not claimed:
        known = sorted({kind.peft_type for kind in _KINDS.values()})
        raise AdapterFormatError(f"{where}: key 'peft_type': expected one of {known}, found "
                                 f"{peft_config.get('peft_type')!r}")
    return claimed[-1]  # a variant registered after its base kind (e.g. DoRA after LoRA) is more specific


def kind_for_file(path: str | os.PathLike) -> AdapterKind:
    """The kind that reads the single adapter file `path` (by its suffix), or an AdapterFormatError."""
    suffix = Path(path).suffix.lower()
    for kind in _KINDS.values():
        if suffix in kind.file_suffixes:
            return kind
    suffixes = sorted({s for kind in _KINDS.values() for s in kind.file_suffixes})
    raise AdapterFormatError(f"{path}: not an adapter directory; an adapter is a directory holding adapter_config.json "
                             f"and adapter_model.safetensors, or a file ending in {' or '.join(suffixes)}")
