"""The adapter bank: many adapters of any kind resident on one base model, routed per batch row.

    AdapterBank(model)                    one slot store per adapter kind (deltaw.adapters.kinds): LoRA's
      │                                   wraps every linear layer in a RoutedLinear, prefix-tuning's
      │                                   hands each row its prefix at the attention interface
      ├─ known adapters    name -> directory on disk, kind (+ pinned flag)
      ├─ resident slots    name -> slot, least recently used first; the slot's kind's store holds it
      └─ routing           the running batch's rows -> ((slot, weight), ...), split by store before each forward

Adapters are read and checked by their kind (`kind.read`, `kind.plan`: shapes, ranks, targets,
base-model fingerprint) before any buffer is touched. A weighted mix (`pirate*0.5+robot*0.5`) is the
exact weighted sum of the members' deltas, so every member's kind must be mixable (LoRA is; a prefix
adapter is not, and such a mix is refused).

Capacity: at most `max_resident` slots, shared by all kinds. Loading one more evicts the least
recently used adapter that no request is using and that is not pinned; an evicted adapter stays known
and is read back from disk when a request asks for it.

Concurrency: two locks. Every change of the stores' contents happens under `bank.forward_lock`, which
the engine holds for each forward pass, so a forward never sees a half-written slot. The name -> slot
map, the LRU order and the slots' users are under `bank.lock`, which a forward does not hold: the
server's event loop checks a request's adapter names (`resolve`, `names`) without waiting for a forward
to end (a lock taken in that order: `lock`, then `forward_lock`, never the reverse). Reading and
validating a file happens outside both. A new or replacing adapter is written into
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

from torch import nn

from deltaw.adapters.files import AdapterFormatError, check_confined
from deltaw.adapters.io import adapter_kind
from deltaw.adapters.kinds import AdapterKind, Route, SlotStore, all_kinds
from deltaw.adapters.state import check_adapter_name

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
    kind: AdapterKind
    root: Path | None  # adapters_dir for an adapter loaded from it (its files stay confined there)
    pinned: bool = False
    slot: int | None = None


class AdapterBank:
    """Many adapters on one base model, each in a slot of its kind's store.

    Args:
        model: a plain base model (no LoRALinear layers); its layers are wrapped in place for routing.
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
        self.lock = threading.RLock()  # the name -> slot map, the LRU order, the slots' users: held briefly
        self.forward_lock = threading.Lock()  # the stores' contents: held for a forward and for a slot's write
        self._slot_freed = threading.Condition(self.lock)
        self.stores: dict[str, SlotStore] = {kind.name: kind.slot_store(model, max_resident) for kind in all_kinds()}
        self._known: dict[str, _Known] = {}
        self._lru: OrderedDict[str, None] = OrderedDict()  # resident names, least recently used first
        self._users = [0] * max_resident  # running requests per slot
        self._retired: set[int] = set()  # replaced/unloaded slots still used by running requests
        self._slot_store: list[SlotStore | None] = [None] * max_resident  # the store each slot's adapter is in

    # ----------------------------------------------------------------------------- loading
    def load(self, name: str, path: str | os.PathLike, pin: bool = False) -> None:
        """Load (or replace) adapter `name` from a PEFT-layout directory and make it resident."""
        self._load(name, Path(path), pin, root=None)

    def load_from_dir(self, name: str, path: str | os.PathLike | None = None) -> None:
        """Load adapter `name` from `<adapters_dir>/<name>`, or from `path` (relative to adapters_dir, or
        absolute: vLLM's `lora_path`) when given.

        Refuses names that are not plain names, paths that do not lead to an entry directly inside
        adapters_dir, and directories or files that are links leading outside it. Error messages name
        paths relative to adapters_dir and never list it: they are meant for remote clients.
        """
        if self.adapters_dir is None:
            raise ValueError("no adapters directory configured: start the bank with adapters_dir=DIR")
        check_adapter_name(name)  # letters, digits, '_' and '-': no '/', '..' or absolute path
        given = name if path is None else path
        resolved = (self.adapters_dir / given).resolve()
        if resolved.parent != self.adapters_dir:
            raise ValueError(f"adapter {name!r}: its path leads outside the adapters directory (a link, '..' or "
                             "another absolute path); copy the adapter into the directory instead")
        if not resolved.is_dir():
            raise FileNotFoundError(f"no adapter directory {resolved.name!r} in the adapters directory; put the "
                                    f"adapter's files in {resolved.name}/ there (or check the name)")
        self._load(name, resolved, False, root=self.adapters_dir)

    def _load(self, name: str, path: Path, pin: bool, root: Path | None) -> None:
        check_adapter_name(name)
        kind, planned = self._read(path, root)
        with self.lock:
            slot = self._free_slot()
            self._write(slot, kind, planned)
            old = self._known.get(name)
            self._known[name] = _Known(path, kind, root, pinned=pin or (old is not None and old.pinned))
            if old is not None and old.slot is not None:
                self._retire(old.slot)
            self._publish(name, slot)

    def unload(self, name: str) -> None:
        """Forget adapter `name`; requests already using it finish on its weights."""
        with self.lock:
            known = self._require(name)
            del self._known[name]
            if known.slot is not None:
                self._lru.pop(name, None)
                self._retire(known.slot)

    def pin(self, name: str) -> None:
        """Keep adapter `name` resident (never evicted); loads it now if it was evicted."""
        with self.lock:
            self._require(name).pinned = True
        self.release(self.acquire(name))

    def unpin(self, name: str) -> None:
        """Let adapter `name` be evicted again."""
        with self.lock:
            self._require(name).pinned = False

    # ----------------------------------------------------------------------------- inspecting
    def names(self) -> list[str]:
        """Every known adapter, resident or evicted."""
        with self.lock:
            return sorted(self._known)

    def resident(self) -> list[str]:
        """Adapters in a slot now, least recently used first."""
        with self.lock:
            return list(self._lru)

    def pinned(self) -> list[str]:
        with self.lock:
            return sorted(name for name, known in self._known.items() if known.pinned)

    def path(self, name: str) -> Path:
        """Where known adapter `name` is read from."""
        with self.lock:
            return self._require(name).path

    def kind(self, name: str) -> AdapterKind:
        """The kind of known adapter `name`."""
        with self.lock:
            return self._require(name).kind

    def memory_bytes(self) -> dict[str, int]:
        """{"base": model parameters and buffers, "adapters": the stores' adapter tensors,
        "resident": resident adapters}."""
        with self.lock:
            stored = {id(t): t for store in self.stores.values() for t in store.tensors()}
        model_tensors = {id(t): t for t in [*self.model.parameters(), *self.model.buffers()]}
        base = sum(t.numel() * t.element_size() for key, t in model_tensors.items() if key not in stored)
        adapters = sum(t.numel() * t.element_size() for t in stored.values())
        return {"base": base, "adapters": adapters, "resident": len(self.resident())}

    # ----------------------------------------------------------------------------- routing
    def resolve(self, choice: AdapterChoice) -> None:
        """Raise UnknownAdapterError unless every name in `choice` is known, or ValueError for a weighted
        mix with a member whose kind cannot be mixed."""
        weights = _choice_weights(choice)
        with self.lock:
            kinds = {name: self._require(name).kind for name in weights}
        if isinstance(choice, dict):
            for name, kind in kinds.items():
                if not kind.mixable:
                    raise ValueError(f"{name!r} is {kind.label}, which cannot be part of a weighted mix; "
                                     "request it alone")

    def acquire(self, choice: AdapterChoice) -> Route:
        """The slots serving `choice` ((slot, weight) pairs), held until `release`; loads evicted adapters."""
        self.resolve(choice)
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
                    if slot in self._retired:
                        self._free(slot)
                    self._slot_freed.notify_all()

    def set_routing(self, routes: list[Route]) -> None:
        """Route row i of the next forward passes to `routes[i]` (call with `forward_lock` held): each store gets
        the rows' routes restricted to its own slots."""
        for store in self.stores.values():
            store.route([tuple(entry for entry in route if self._slot_store[entry[0]] is store) for route in routes])

    # ----------------------------------------------------------------------------- internals
    def _require(self, name: str) -> _Known:
        if name not in self._known:
            raise UnknownAdapterError(name, sorted(self._known))
        return self._known[name]

    def _read(self, path: Path, root: Path | None, kind: AdapterKind | None = None) -> tuple[AdapterKind, object]:
        """Read and check the adapter in `path` against the model: (its kind, the kind's planned form).

        With `root` (an adapter of adapters_dir), every file must resolve inside it, and errors name
        paths relative to it. The kind comes from the directory's config unless given.
        """
        try:
            if root is not None:
                check_confined(path, root)
            kind = kind or adapter_kind(path)
            return kind, kind.plan(self.model, kind.read(path), ignore_fingerprint=self.ignore_fingerprint)
        except (ValueError, OSError) as exc:
            if root is None:
                raise
            raise _relative_to(exc, root) from None

    def _acquire_one(self, name: str) -> int:
        """Count one more user of `name`'s slot, reading it back from disk first if it was evicted."""
        while True:
            with self.lock:
                known = self._require(name)
                if known.slot is not None:
                    self._users[known.slot] += 1
                    self._lru.move_to_end(name)
                    return known.slot
                path, kind, root = known.path, known.kind, known.root
            _, planned = self._read(path, root, kind)  # outside the lock: other adapters keep serving
            with self.lock:
                known = self._require(name)
                if known.slot is None and known.path == path:
                    slot = self._free_slot()
                    self._write(slot, kind, planned)
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

    def _write(self, slot: int, kind: AdapterKind, planned: object) -> None:
        """Write `planned` into `slot` of its kind's store; the store that held the slot before forgets it."""
        store = self.stores[kind.name]
        with self.forward_lock:
            previous = self._slot_store[slot]
            if previous is not None and previous is not store:  # an evicted adapter of another kind
                previous.clear(slot)
            store.write(slot, planned)
            self._slot_store[slot] = store

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
        """`slot` holds nothing any more: its store forgets it, and loads waiting in `_free_slot` look again."""
        self._retired.discard(slot)
        with self.forward_lock:
            store, self._slot_store[slot] = self._slot_store[slot], None
            if store is not None:
                store.clear(slot)
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


def _relative_to(error: ValueError | OSError, root: Path) -> ValueError | OSError:
    """`error` with `root` cut out of its message: paths under it read `name/file`, `root` itself reads
    "the adapters directory" (what a remote client may see of the server's file system)."""
    message = str(error).replace(f"{root}{os.sep}", "").replace(str(root), "the adapters directory")
    try:
        return type(error)(message)
    except TypeError:  # an exception class with another signature
        return (AdapterFormatError if isinstance(error, ValueError) else OSError)(message)
