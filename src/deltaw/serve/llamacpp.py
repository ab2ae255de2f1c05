"""llama-server's adapter model, mapped onto deltaw's: adapter ids, server-wide scales, per-request `lora` lists.

    GET  /lora-adapters   [{"id": 0, "path": ..., "scale": 0.0, ...}, ...]   ids: LoraTable
    POST /lora-adapters   [{"id": 0, "scale": 0.5}]      the server-wide mix, for requests naming the base model
    request "lora": [{"id": 0, "scale": 0.5}, ...]       this request's mix (the base model + Σ scale·adapter)

In llama-server every request runs the base model plus the adapters at their scales. deltaw maps such a
list onto its exact weighted mix of LoRA deltas, computed per batch row (so requests with different
lists share a batch). Where deltaw differs, it says so instead of guessing: an unknown id is a 400 (llama-
server ignores it), the server-wide scales start at 0 (llama-server starts them at 1), so the base
model's name keeps meaning the base model until a client sets them, and only adapters that can be part of a
mix (LoRA, DoRA, embedding LoRA, token rows) get an id: a prefix adapter is not listed (llama-server lists
LoRA adapters only) and is used by naming it in `model`.
"""

from __future__ import annotations

import threading

from deltaw.serve.bank import AdapterBank, AdapterChoice
from deltaw.serve.protocol import LoraScale


class LoraTable:
    """Stable ids for the served adapters (llama.cpp's way of naming them) and the server-wide scales.

    Ids go to the adapters known when first asked, in name order, then to each new name as it appears; a
    name keeps its id for the server's life (unloaded and loaded again included), so an id a client read
    from GET /lora-adapters never points at another adapter.
    """

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}
        self._scales: dict[str, float] = {}
        self._lock = threading.Lock()

    def ids(self, names: list[str]) -> dict[str, int]:
        """{name: id} for the adapters `names` (the bank's), ordered by id."""
        with self._lock:
            for name in sorted(names):
                self._ids.setdefault(name, len(self._ids))
            return {name: self._ids[name] for name in sorted(names, key=self._ids.__getitem__)}

    def scale(self, name: str) -> float:
        """The server-wide scale of adapter `name` (0: not applied)."""
        with self._lock:
            return self._scales.get(name, 0.0)

    def set_scales(self, mix: dict[str, float]) -> None:
        """The new server-wide scales: `mix`, every other adapter 0 (as llama-server's POST /lora-adapters)."""
        with self._lock:
            self._scales = dict(mix)

    def server_mix(self, names: list[str]) -> dict[str, float]:
        """The server-wide mix over the adapters still served."""
        with self._lock:
            return {name: scale for name, scale in self._scales.items() if name in names and scale != 0}


def lora_names(bank: AdapterBank) -> list[str]:
    """The served adapters a `lora` list can hold: those a weighted mix may contain (not prefix adapters)."""
    names = []
    for name in bank.names():
        try:
            if bank.kind(name).mixable:
                names.append(name)
        except KeyError:  # unloaded meanwhile
            continue
    return names


def lora_mix(table: LoraTable, bank: AdapterBank, entries: list[LoraScale]) -> dict[str, float]:
    """{name: scale} for a `lora` list (zero scales dropped; for a repeated id the last wins, as llama-server).

    Raises:
        ValueError: an id that names no served adapter that can be mixed.
    """
    by_id = {index: name for name, index in table.ids(lora_names(bank)).items()}
    mix: dict[str, float] = {}
    for entry in entries:
        if entry.id not in by_id:
            served = ", ".join(f"{index} ({name})" for index, name in by_id.items()) or "none"
            raise ValueError(f"no adapter has id {entry.id}; the served ids (GET /lora-adapters) are: {served} "
                             "(a prefix adapter has no id: name it in 'model' instead)")
        mix[by_id[entry.id]] = entry.scale
    return {name: scale for name, scale in mix.items() if scale != 0}


def mix_choice(mix: dict[str, float]) -> AdapterChoice:
    """A mix as an adapter choice: {} is the base model, one adapter at scale 1 is that adapter by name."""
    if not mix:
        return None
    if len(mix) == 1 and next(iter(mix.values())) == 1.0:
        return next(iter(mix))
    return mix


def request_choice(table: LoraTable, bank: AdapterBank, choice: AdapterChoice,
                   lora: list[LoraScale] | None) -> AdapterChoice:
    """What a request runs: `choice` (from its `model`), or its `lora` list on the base model, or for the base
    model without a list, the server-wide mix.

    Raises:
        ValueError: a `lora` list on a request whose `model` names an adapter, or an unknown id.
    """
    if lora:
        if choice is not None:
            raise ValueError("'lora' lists adapters to add to the base model: set 'model' to the base model's name, "
                             "or leave out 'lora' and name the adapter in 'model'")
        return mix_choice(lora_mix(table, bank, lora))
    if choice is None:
        return mix_choice(table.server_mix(lora_names(bank)))
    return choice
