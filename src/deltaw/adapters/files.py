"""Adapter directories on disk, whatever the kind: PEFT's two files, read and written safely.

    DIR/adapter_config.json         {"peft_type": ..., <the kind's keys>, "deltaw": {"fingerprint": {...}, ...}}
    DIR/adapter_model.safetensors   the kind's tensors, keys as PEFT writes them

deltaw's own facts live under the one extra config key "deltaw", which PEFT ignores. Pickle files
(.bin, .pt) are refused: unpickling runs code. Each kind (deltaw.adapters.kinds) parses the config and
tensors these functions return; every error names the file, the key, and what to do. A directory
served from a root (`deltaw serve --adapters-dir`) is first checked with `check_confined`: no file in
it may be a link that leads outside the root.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from deltaw.adapters.fingerprint import fingerprint_mismatch, model_fingerprint

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin")


class AdapterFormatError(ValueError):
    """An adapter directory that cannot be loaded as it is; the message says why and what to do."""


def read_adapter_config(path: str | os.PathLike) -> dict:
    """The JSON object in `path`/adapter_config.json, whatever its peft_type."""
    if not Path(path).is_dir():
        raise AdapterFormatError(
            f"{path}: not a directory; an adapter is a directory holding {CONFIG_FILE} and {WEIGHTS_FILE}"
        )
    config_file = Path(path) / CONFIG_FILE
    if not config_file.is_file():
        raise AdapterFormatError(f"{config_file}: missing; an adapter directory needs {CONFIG_FILE}")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFormatError(f"{config_file}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{config_file}: expected a JSON object, found {type(config).__name__}")
    return config


def check_confined(path: str | os.PathLike, root: str | os.PathLike) -> None:
    """Raise AdapterFormatError unless directory `path` and every entry in it resolve inside `root`.

    Symbolic links are followed to their targets, so a link to a file (or a directory) elsewhere on
    the machine is refused before anything is read. Messages name paths relative to `root` only.
    """
    root, path = Path(root).resolve(), Path(path)
    where = path.name
    if not path.resolve().is_relative_to(root):
        raise AdapterFormatError(f"{where}: a link that leads outside the adapters directory; "
                                 "copy the adapter into the directory instead of linking it")
    for entry in sorted(path.resolve().iterdir()):
        if not entry.resolve().is_relative_to(root):
            raise AdapterFormatError(f"{where}/{entry.name}: a link that leads outside the adapters directory; "
                                     "copy the file into the adapter's directory instead of linking it")


def read_adapter_dir(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """adapter_config.json and the safetensors tensors of an adapter directory, as stored.

    Pickle weight files are refused; a missing, non-JSON or truncated file is an AdapterFormatError.
    """
    path = Path(path)
    config = read_adapter_config(path)
    weights_file = path / WEIGHTS_FILE
    if not weights_file.is_file():
        pickled = [name for name in PICKLE_FILES if (path / name).exists()]
        if pickled:
            raise AdapterFormatError(
                f"{path / pickled[0]}: refusing to load a pickle file, since unpickling can run arbitrary code. "
                f"Convert it once, in an environment you trust, to {WEIGHTS_FILE} (e.g. load it in PEFT and "
                "call save_pretrained(..., safe_serialization=True))"
            )
        raise AdapterFormatError(f"{weights_file}: missing; an adapter directory needs {WEIGHTS_FILE}")
    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterFormatError(
            f"{weights_file}: truncated or corrupt safetensors file ({exc}); save or copy the adapter again"
        ) from exc
    return config, tensors


def write_adapter_files(path: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    """Write `tensors` (safetensors) and `config` (JSON) into directory `path`, each file atomically."""
    tensors = {key: tensor.detach().cpu().contiguous() for key, tensor in tensors.items()}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights_tmp = path / f".{WEIGHTS_FILE}.tmp"
    save_file(tensors, str(weights_tmp), metadata={"format": "pt"})
    os.replace(weights_tmp, path / WEIGHTS_FILE)
    config_tmp = path / f".{CONFIG_FILE}.tmp"
    config_tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(config_tmp, path / CONFIG_FILE)
    return path


def deltaw_section(config: dict) -> dict:
    """The config's "deltaw" section (deltaw's own facts; {} for an adapter written by another tool)."""
    section = config.get("deltaw")
    return section if isinstance(section, dict) else {}


def check_fingerprint(model: nn.Module, config: dict, config_file: Path) -> None:
    """Raise AdapterFormatError if the adapter's recorded base-model fingerprint differs from `model`'s."""
    expected = deltaw_section(config).get("fingerprint")
    if not expected:
        return  # written by another tool: the shape checks are all there is to go on
    differences = fingerprint_mismatch(expected, model_fingerprint(model))
    if differences:
        raise AdapterFormatError(
            f"{config_file}: the adapter was made for another base model ("
            + "; ".join(differences)
            + "). Load it on the model it was trained on, or pass ignore_fingerprint=True "
            "(--ignore-fingerprint) if you know the bases are compatible"
        )


def size_on_disk(path: Path) -> int:
    """Bytes of the files directly in directory `path`."""
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())
