"""Loading, saving and describing adapters of any kind: read the directory's peft_type, then ask its kind."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltaw.adapters.files import CONFIG_FILE, deltaw_section, read_adapter_config
from deltaw.adapters.kinds import AdapterKind, kind_for_file, kind_for_peft, kind_of
from deltaw.adapters.state import AdapterRecord, adapters_of, check_adapter_name, require_adapter


def adapter_kind(path: str | os.PathLike) -> AdapterKind:
    """The kind of the adapter at `path`: a directory's adapter_config.json says, a single file's suffix does
    (a llama.cpp LoRA .gguf)."""
    if Path(path).is_file():
        return kind_for_file(path)
    return kind_for_peft(read_adapter_config(path), Path(path) / CONFIG_FILE)


def read_adapter(path: str | os.PathLike) -> Any:
    """Read and check the adapter at `path` on its own (no model needed): LoRA adapters give an AdapterFile
    (config, module -> (A, B); a .gguf file a GGUFAdapterFile), prefix adapters a PrefixFile."""
    return adapter_kind(path).read(Path(path))


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    name: str | None = None,
    ignore_fingerprint: bool = False,
    dtype: torch.dtype | None = None,
) -> AdapterRecord:
    """Load the adapter at `path` onto `model` as `name` (not activated: see set_adapter).

    Any kind deltaw knows (LoRA, prefix-tuning) in PEFT's layout, or a llama.cpp LoRA .gguf file. The
    name defaults to the directory's name or the file's stem. Everything is read and checked first; a
    rejected file leaves the model exactly as it was. Tensors take the base weights' dtype unless `dtype`
    is given.
    """
    if name is None:
        given = Path(str(path).rstrip("/"))
        name = given.stem if given.is_file() else given.name
    check_adapter_name(name)
    if name in adapters_of(model).adapters:
        raise ValueError(f"adapter {name!r} is already loaded; delete_adapter(model, {name!r}) first or pick another name")
    kind = adapter_kind(path)
    adapter = kind.read(Path(path))
    planned = kind.plan(model, adapter, ignore_fingerprint=ignore_fingerprint, dtype=dtype)
    return kind.attach(model, name, planned, dict(deltaw_section(adapter.config)))


def save_adapter(model: nn.Module, path: str | os.PathLike, name: str, metadata: dict | None = None) -> Path:
    """Write adapter `name` to directory `path` in PEFT's layout; each file is replaced atomically.

    `metadata` is merged into the config's "deltaw" section (e.g. how the adapter was trained).
    """
    record = require_adapter(model, name)
    written = kind_of(record).save(model, name, Path(path), dict(metadata or {}))
    record.metadata.update(metadata or {})
    return written


def describe_adapter(path: str | os.PathLike) -> str:
    """A human-readable summary of the adapter in `path`: kind, geometry, parameters, size, fingerprint."""
    kind = adapter_kind(path)
    return kind.describe(kind.read(Path(path)))


def parse_adapter_spec(spec: str) -> tuple[str, str]:
    """'name=DIR' -> (name, DIR); a bare DIR is named after its last path component."""
    name, sep, path = spec.partition("=")
    if not sep:
        path, name = spec, Path(spec.rstrip("/")).name
    return name, path
