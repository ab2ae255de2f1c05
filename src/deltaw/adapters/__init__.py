"""Adapters: the kinds deltaw trains, loads, merges and serves, behind one seam (deltaw.adapters.kinds).

    state.py        per model: adapter records, the active adapter, names
    kinds.py        AdapterKind (one per kind) and SlotStore (its serving form); the registry
    files.py        adapter directories: PEFT's two files, safely read and written; the fingerprint check
    io.py           load_adapter / save_adapter / describe_adapter for any kind
    manage.py       set / list / delete / disable / merge / unmerge for any kind
    targets.py      which modules to adapt: one full-match syntax, loud errors
    fingerprint.py  the base-model identity stored in adapter configs
    lora/           LoRA (registered first)
    prefix/         prefix-tuning
"""

from deltaw.adapters import lora, prefix  # noqa: F401 (registers the kinds)
from deltaw.adapters.files import AdapterFormatError
from deltaw.adapters.io import describe_adapter, load_adapter, parse_adapter_spec, read_adapter, save_adapter
from deltaw.adapters.manage import (
    active_adapter,
    deactivate_adapters,
    delete_adapter,
    disable_adapters,
    list_adapters,
    merge_adapter,
    merged_adapter,
    set_adapter,
    unmerge_adapter,
)
from deltaw.adapters.state import AdapterRecord, require_adapter

__all__ = [
    "AdapterFormatError", "AdapterRecord", "active_adapter", "deactivate_adapters", "delete_adapter",
    "describe_adapter", "disable_adapters", "list_adapters", "load_adapter", "merge_adapter", "merged_adapter",
    "parse_adapter_spec", "read_adapter", "require_adapter", "save_adapter", "set_adapter", "unmerge_adapter",
]
