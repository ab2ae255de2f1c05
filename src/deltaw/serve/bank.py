"""The adapter bank: many LoRA adapters resident on one base model, routed per batch row.

    AdapterBank(model)                    wraps every linear layer in a RoutedLinear (serve/routed.py)
      ├─ known adapters    name -> directory on disk (+ pinned flag)
      ├─ resident slots    name -> slot in the stacked buffers, least recently used first
      └─ routing           the running batch's rows -> slots, shared by every layer

Prefix-tuning adapters (peft_type PREFIX_TUNING) need no slot: their prefixes [T, layers·2·token_dim]
(0.9 MB for 20 tokens on the bundled model) stay resident by name, a request takes a reference to
them, and the engine hands each batch row its prefix (deltaw.prefix.set_prefix_rows), so prefix and
LoRA requests share one batch. A prefix cannot be part of a weighted mix.

Adapters are read with `deltaw.adapter.read_adapter` and checked with `plan_load` (shapes, ranks,
targets, base-model fingerprint) before any buffer is touched. Different ranks and target sets
share the buffers: they are zero-padded to the largest rank, and a layer an adapter does not target
holds zeros (scaling 0) in its slot.

Capacity: at most `max_resident` slots. Loading one more evicts the least recently used adapter
that no request is using and that is not pinned; an evicted adapter stays known and is read back
from disk when a request asks for it.

Concurrency: every change of the buffers or of the name -> slot map happens under `bank.lock`, and
the engine holds that lock for each forward pass, so a forward never sees a half-written slot.
Reading and validating a file happens outside the lock. A new or replacing adapter is written into
a free slot first and only then published under its name: requests admitted later use it, while
requests already running keep the slot they were admitted with and finish on the old weights
(`acquire` counts references per slot; a replaced or unloaded slot is freed when its last request
releases it).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from deltaw.adapter import PlannedLayer, is_prefix_adapter_dir, plan_load, read_adapter
from deltaw.lora import LoRALinear, check_adapter_name
from deltaw.prefix import prefix_store
from deltaw.prefix_files import check_prefix_fits, read_prefix_adapter
from deltaw.serve.routed import Route, RoutedLinear, Routing
from deltaw.targets import linear_modules

AdapterChoice = str | dict[str, float] | None
"""None (the base model), an adapter name, or a weighted mix {name: weight}."""


class UnknownAdapterError(KeyError):
    """A request named an adapter the bank does not know; the message lists the known ones."""

    def __init__(self, name: str, known: list[str]) -> None:
        self.name, self.known = name, known
        super().__init__(f"no adapter named {name!r}; known adapters: {', '.join(known) or 'none'}")

    def __str__(self) -> str:
        return self.args[0]


class BankFullError(RuntimeError):
    """Every slot is held by a running request or a pinned adapter; raise max_resident or retry."""


@dataclass
class _Known:
    path: Path
    pinned: bool = False
    slot: int | None = None


class AdapterBank:
    """Many adapters on one base model, each in a slot of stacked per-layer buffers.

    Args:
        model: a plain base model (no LoRALinear layers); its linear layers are wrapped in place.
        max_resident: how many adapters may be resident at once (slots); more are evicted LRU.
        adapters_dir: the directory `load_from_dir` may load from (None: disabled).
        ignore_fingerprint: load adapters whose recorded base-model fingerprint differs.
        wait_for_slot: seconds `acquire`/`load` wait for a slot to free before BankFullError.
    """

    def __init__(
        self,
        model: nn.Module,
        max_resident: int = 32,
        adapters_dir: str | os.PathLike | None = None,
        ignore_fingerprint: bool = False,
        wait_for_slot: float = 30.0,
    ) -> None:
        if max_resident < 1:
            raise ValueError(f"max_resident must be at least 1, found {max_resident}")
        self.model, self.max_resident = model, max_resident
        self.adapters_dir = None if adapters_dir is None else Path(adapters_dir).resolve()
        self.ignore_fingerprint, self.wait_for_slot = ignore_fingerprint, wait_for_slot
        self.lock = threading.RLock()
        self._slot_freed = threading.Condition(self.lock)
        self.routing = Routing()
        self.layers = _wrap_linears(model, self.routing)
        self._known: dict[str, _Known] = {}
        self._lru: OrderedDict[str, None] = OrderedDict()  # resident names, least recently used first
        self._users = [0] * max_resident  # running requests per slot
        self._retired: set[int] = set()  # replaced/unloaded slots still used by running requests
        self._capacity = 0  # slots allocated in every layer that has buffers
        self._prefixes: dict[str, torch.Tensor] = {}  # prefix adapters: name -> [T, layers·2·token_dim]
        prefix_store(model)  # the attention hook that serves per-row prefixes

    # ----------------------------------------------------------------------------- loading
    def load(self, name: str, path: str | os.PathLike, pin: bool = False) -> None:
        """Load (or replace) adapter `name` from a PEFT-layout directory and make it resident."""
        check_adapter_name(name)
        if is_prefix_adapter_dir(path):
            self._load_prefix(name, path)
            return
        planned = self._read(path)
        with self.lock:
            self._prefixes.pop(name, None)
            slot = self._free_slot()
            self._write(slot, planned)
            old = self._known.get(name)
            self._known[name] = _Known(Path(path), pinned=pin or (old is not None and old.pinned))
            if old is not None and old.slot is not None:
                self._retire(old.slot)
            self._publish(name, slot)

    def _load_prefix(self, name: str, path: str | os.PathLike) -> None:
        """Read and check a prefix adapter, then publish it under `name` (replacing any adapter of that name)."""
        adapter = read_prefix_adapter(path)
        check_prefix_fits(self.model, adapter, self.ignore_fingerprint)
        weight = next(self.model.parameters())
        prefixes = adapter.prompt_embeddings.to(weight.device, weight.dtype)
        with self.lock:
            if name in self._known:
                self.unload(name)
            self._prefixes[name] = prefixes

    def prefix_for(self, choice: AdapterChoice) -> torch.Tensor | None:
        """The prefixes a request for `choice` runs with, or None when `choice` is not a prefix adapter."""
        with self.lock:
            if isinstance(choice, str):
                return self._prefixes.get(choice)
            mixed = sorted(set(choice or ()) & set(self._prefixes))
        if mixed:
            raise ValueError(f"{mixed[0]!r} is a prefix adapter, which cannot be part of a weighted mix; "
                             "request it alone")
        return None

    def load_from_dir(self, name: str) -> None:
        """Load adapter `name` from `<adapters_dir>/<name>`; refuses names that are not plain names and
        symlinks that lead outside adapters_dir."""
        if self.adapters_dir is None:
            raise ValueError("no adapters directory configured: start the bank with adapters_dir=DIR")
        check_adapter_name(name)  # letters, digits, '_' and '-': no '/', '..' or absolute path
        path = (self.adapters_dir / name).resolve()
        if path.parent != self.adapters_dir:
            raise ValueError(f"adapter {name!r} resolves to {path}, outside the adapters directory {self.adapters_dir}")
        if not path.is_dir():
            raise FileNotFoundError(f"no adapter directory {self.adapters_dir / name}; "
                                    f"available: {', '.join(self.available()) or 'none'}")
        self.load(name, path)

    def available(self) -> list[str]:
        """Adapter directories under adapters_dir (candidates for load_from_dir)."""
        if self.adapters_dir is None or not self.adapters_dir.is_dir():
            return []
        return sorted(entry.name for entry in self.adapters_dir.iterdir() if entry.is_dir())

    def unload(self, name: str) -> None:
        """Forget adapter `name`; requests already using it finish on its weights."""
        with self.lock:
            if self._prefixes.pop(name, None) is not None:
                return
            known = self._require(name)
            del self._known[name]
            if known.slot is not None:
                self._lru.pop(name, None)
                self._retire(known.slot)

    def pin(self, name: str) -> None:
        """Keep adapter `name` resident (never evicted); loads it now if it was evicted. Prefix adapters
        are always resident."""
        with self.lock:
            if name in self._prefixes:
                return
            self._require(name).pinned = True
        self.release(self.acquire(name))

    def unpin(self, name: str) -> None:
        """Let adapter `name` be evicted again."""
        with self.lock:
            if name in self._prefixes:
                return
            self._require(name).pinned = False

    # ----------------------------------------------------------------------------- inspecting
    def names(self) -> list[str]:
        """Every known adapter, resident or evicted."""
        with self.lock:
            return sorted([*self._known, *self._prefixes])

    def resident(self) -> list[str]:
        """Adapters in a slot now, least recently used first, then the (always resident) prefix adapters."""
        with self.lock:
            return [*self._lru, *self._prefixes]

    def pinned(self) -> list[str]:
        with self.lock:
            return sorted(name for name, known in self._known.items() if known.pinned)

    def memory_bytes(self) -> dict[str, int]:
        """{"base": model parameters and buffers, "adapters": the slot buffers and prefix adapters,
        "resident": resident adapters}."""
        adapter_tensors = {id(t) for layer in self.layers.values() for t in (layer.lora_a, layer.lora_bt)
                           if t is not None}
        tensors = {id(t): t for t in [*self.model.parameters(), *self.model.buffers()]}
        size = {key: t.numel() * t.element_size() for key, t in tensors.items()}
        adapters = sum(value for key, value in size.items() if key in adapter_tensors)
        with self.lock:
            prefixes = sum(t.numel() * t.element_size() for t in self._prefixes.values())
        return {"base": sum(size.values()) - adapters, "adapters": adapters + prefixes,
                "resident": len(self.resident())}

    # ----------------------------------------------------------------------------- routing
    def resolve(self, choice: AdapterChoice) -> None:
        """Raise UnknownAdapterError (or ValueError for a bad mix) unless every name in `choice` is known."""
        if self.prefix_for(choice) is not None:
            return
        for name in _choice_weights(choice):
            with self.lock:
                self._require(name)

    def acquire(self, choice: AdapterChoice) -> Route:
        """The slots serving `choice` ((slot, weight) pairs), held until `release`; loads evicted adapters."""
        weights = _choice_weights(choice)
        route: list[tuple[int, float]] = []
        try:
            for name, weight in weights.items():
                route.append((self._acquire_one(name), weight))
        except BaseException:
            self.release(tuple(route))
            raise
        return tuple(route)

    def release(self, route: Route) -> None:
        """Give back the slots of a finished request."""
        with self.lock:
            for slot, _ in route:
                self._users[slot] -= 1
                if self._users[slot] == 0:  # evictable now, or free if it was replaced or unloaded
                    self._free(slot)

    def set_routing(self, routes: list[Route]) -> None:
        """Route row i of the next forward passes to `routes[i]` (call with `lock` held)."""
        self.routing.set(routes)

    # ----------------------------------------------------------------------------- internals
    def _require(self, name: str) -> _Known:
        if name not in self._known:
            raise UnknownAdapterError(name, sorted([*self._known, *self._prefixes]))
        return self._known[name]

    def _read(self, path: str | os.PathLike) -> list[PlannedLayer]:
        return plan_load(self.model, read_adapter(path), ignore_fingerprint=self.ignore_fingerprint)

    def _acquire_one(self, name: str) -> int:
        """Count one more user of `name`'s slot, reading it back from disk first if it was evicted."""
        while True:
            with self.lock:
                known = self._require(name)
                if known.slot is not None:
                    self._users[known.slot] += 1
                    self._lru.move_to_end(name)
                    return known.slot
                path = known.path
            planned = self._read(path)  # outside the lock: other adapters keep serving
            with self.lock:
                known = self._require(name)
                if known.slot is None and known.path == path:
                    slot = self._free_slot()
                    self._write(slot, planned)
                    self._publish(name, slot)

    def _free_slot(self) -> int:
        """A slot nobody uses, evicting the least recently used idle, unpinned adapter if needed."""
        while True:
            taken = {known.slot for known in self._known.values() if known.slot is not None} | self._retired
            for slot in range(self.max_resident):
                if slot not in taken:
                    return slot
            for name in self._lru:
                known = self._known[name]
                if not known.pinned and self._users[known.slot] == 0:
                    slot = known.slot
                    known.slot = None
                    del self._lru[name]
                    return slot
            if not self._slot_freed.wait(self.wait_for_slot):
                raise BankFullError(
                    f"all {self.max_resident} adapter slots are pinned or in use by running requests; "
                    "raise max_resident (--max-resident), unpin adapters, or retry later"
                )

    def _write(self, slot: int, planned: list[PlannedLayer]) -> None:
        """Write `planned` into `slot` of every layer (zeros where it targets nothing). Every layer with
        buffers holds `_capacity` slots, grown geometrically: loading n adapters copies O(n) slots."""
        if slot >= self._capacity:
            self._capacity = min(self.max_resident, max(slot + 1, 2 * self._capacity))
        targeted = {layer.module: layer for layer in planned}
        for module, routed in self.layers.items():
            if module in targeted:
                layer = targeted[module]
                routed.reserve(self._capacity, layer.lora_a.shape[0])
                routed.write_slot(slot, layer.lora_a, layer.lora_b, layer.scaling)
            elif routed.lora_a is not None:
                routed.reserve(self._capacity, 0)
                routed.clear_slot(slot)
        self.routing.invalidate()

    def _publish(self, name: str, slot: int) -> None:
        self._known[name].slot = slot
        self._lru[name] = None
        self._lru.move_to_end(name)

    def _retire(self, slot: int) -> None:
        """`slot` no longer holds a published adapter: free now, or when its last request ends."""
        if self._users[slot] > 0:
            self._retired.add(slot)
        else:
            self._free(slot)

    def _free(self, slot: int) -> None:
        """`slot` may be taken now (loads waiting in `_free_slot` look again)."""
        self._retired.discard(slot)
        self._slot_freed.notify_all()


def _choice_weights(choice: AdapterChoice) -> dict[str, float]:
    """{name: weight} for a choice: {} for the base model, {name: 1.0} for one adapter."""
    if choice is None:
        return {}
    if isinstance(choice, str):
        return {choice: 1.0}
    if isinstance(choice, dict) and choice:
        return {str(name): float(weight) for name, weight in choice.items()}
    raise ValueError(f"adapter choice must be None, a name or a non-empty {{name: weight}} mix, found {choice!r}")


def _wrap_linears(model: nn.Module, routing: Routing) -> dict[str, RoutedLinear]:
    """Replace every nn.Linear of `model` by a RoutedLinear sharing `routing`; return them by name."""
    lora = [name for name, module in model.named_modules() if isinstance(module, LoRALinear)]
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
