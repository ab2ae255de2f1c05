"""`deltaw export`: an adapter written in another engine's format (llama.cpp's LoRA GGUF, for llama-server --lora
and Ollama's ADAPTER)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from transformers import AutoConfig

from deltaw.adapters import AdapterFormatError
from deltaw.adapters.files import CONFIG_FILE, deltaw_section, read_adapter_config
from deltaw.adapters.io import adapter_kind
from deltaw.adapters.lora.files import read_lora_adapter
from deltaw.adapters.lora.gguf import OUTTYPES, GGUFReport, write_gguf
from deltaw.models.loading import BUNDLED_NAME, resolve_model_dir

FORMATS = ("gguf",)


@dataclass
class ExportOptions:
    """What `deltaw export` writes.

    Attributes:
        adapter: the adapter directory (PEFT layout).
        out: the file to write (e.g. pirate.gguf).
        format: gguf: llama.cpp's LoRA adapter (llama-server --lora FILE, Ollama's ADAPTER FILE).
        outtype: the tensors' type in the file.
        model: the base model whose config (architecture, attention heads) fixes llama.cpp's tensor layout;
            only its config is read.
        overwrite: replace an existing --out file.
    """

    adapter: str = field(metadata={"positional": True})
    out: str
    format: str = field(default="gguf", metadata={"choices": FORMATS})
    outtype: str = field(default="f32", metadata={"choices": OUTTYPES})
    model: str | None = field(default=None, metadata={
        "default_help": f"the adapter's base_model_name_or_path, else {BUNDLED_NAME}"})
    overwrite: bool = False

    OUT_IS_FILE: ClassVar[bool] = True  # the CLI checks --out's directory, not --out itself


def export_adapter(options: ExportOptions) -> GGUFReport:
    """Write `options.adapter` as a llama.cpp LoRA GGUF; refuses what that format cannot hold.

    Raises:
        AdapterFormatError: a prefix-tuning or DoRA adapter, token rows, a LoRA on a tied embedding, a module
            llama.cpp has no tensor for, or a base model that does not match the adapter.
        FileExistsError: --out exists and --overwrite was not given.
    """
    if options.format not in FORMATS:
        raise ValueError(f"--format must be one of {FORMATS}, found {options.format!r}")
    if Path(options.out).exists() and not options.overwrite:
        raise FileExistsError(f"{options.out} exists; pass --overwrite to replace it or choose another --out")
    path = Path(options.adapter)
    _check_exportable(path)
    adapter = read_lora_adapter(path)
    model = options.model or adapter.config.get("base_model_name_or_path") or BUNDLED_NAME
    base_config = AutoConfig.from_pretrained(resolve_model_dir(model))
    _check_base(path, adapter.config, base_config, model)
    return write_gguf(adapter, base_config, options.out, options.outtype)


def _check_exportable(path: Path) -> None:
    """Refuse adapters llama.cpp's LoRA GGUF cannot hold, saying why and what to do instead."""
    if path.is_file():
        raise AdapterFormatError(f"{path}: export reads an adapter directory (PEFT layout), not a file")
    kind = adapter_kind(path)
    if kind.name != "lora":
        raise AdapterFormatError(f"{path}: is {kind.label}; llama.cpp's adapter GGUF holds LoRA pairs (A, B) only. "
                                 "Serve it with deltaw serve, or train a LoRA adapter (--method lora) to export")
    if read_adapter_config(path).get("use_dora"):
        raise AdapterFormatError(f"{path / CONFIG_FILE}: key 'use_dora' = True: llama.cpp's LoRA GGUF has no DoRA "
                                 "magnitude vectors. Merge the adapter (deltaw merge) and convert the merged model "
                                 "with llama.cpp's convert_hf_to_gguf.py instead")


def _check_base(path: Path, config: dict, base_config: object, model: str) -> None:
    """The base model must be the one the adapter's fingerprint names (architecture and head count)."""
    recorded = deltaw_section(config).get("fingerprint", {}).get("architecture", "")
    numbers = dict(part.split("=", 1) for part in recorded.split(",") if "=" in part)
    for key in ("model_type", "num_attention_heads", "hidden_size"):
        if key in numbers and numbers[key] != str(getattr(base_config, key, None)):
            raise AdapterFormatError(
                f"{path / CONFIG_FILE}: the adapter was made for a base with {key}={numbers[key]}, but --model "
                f"{model} has {key}={getattr(base_config, key, None)}; pass the adapter's base model as --model"
            )
