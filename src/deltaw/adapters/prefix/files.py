"""Prefix-tuning adapters on disk, in PEFT's layout, checked against the model before it is touched.

    DIR/adapter_config.json         {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM",
                                     "num_virtual_tokens": T, "num_layers": L, "token_dim": kv_heads·head_dim,
                                     "num_attention_heads": kv_heads, "num_transformer_submodules": 1,
                                     "prefix_projection": false, ..., "deltaw": {"fingerprint": {...}, ...}}
    DIR/adapter_model.safetensors   prompt_embeddings  [T, L·2·token_dim]   (layer, key/value, head, head_dim)

For grouped-query attention PEFT sets token_dim and num_attention_heads from the key/value heads
(peft#1901), and so does deltaw. The file holds the final prefixes: a prefix trained through a
projection MLP is saved as the prefixes the MLP produced (PEFT does the same), so the saved config
says prefix_projection false and PEFT loads it as plain prefixes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from deltaw.adapters.files import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterFormatError,
    check_fingerprint,
    deltaw_section,
    read_adapter_dir,
    size_on_disk,
    write_adapter_files,
)
from deltaw.adapters.fingerprint import model_fingerprint
from deltaw.adapters.prefix.config import PrefixConfig
from deltaw.adapters.prefix.encoder import add_prefix_tensor, prefix_values
from deltaw.adapters.prefix.layout import PrefixShape
from deltaw.adapters.state import AdapterRecord, require_adapter

PREFIX_TUNING = "PREFIX_TUNING"
TENSOR_KEY = "prompt_embeddings"
_POSITIVE_KEYS = ("num_virtual_tokens", "num_layers", "token_dim", "num_attention_heads")


@dataclass
class PrefixFile:
    """A parsed prefix-tuning adapter directory.

    Attributes:
        path: the directory.
        config: adapter_config.json as a dict.
        prompt_embeddings: [T, num_layers·2·token_dim], as stored.
    """

    path: Path
    config: dict
    prompt_embeddings: torch.Tensor

    @property
    def num_parameters(self) -> int:
        return self.prompt_embeddings.numel()


def read_prefix_adapter(path: str | os.PathLike) -> PrefixFile:
    """Read and check a prefix-tuning adapter directory on its own (no model needed)."""
    path = Path(path)
    config, tensors = read_adapter_dir(path)
    config_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    if config.get("peft_type") != PREFIX_TUNING:
        raise AdapterFormatError(f"{config_file}: key 'peft_type': expected {PREFIX_TUNING!r}, "
                                 f"found {config.get('peft_type')!r}")
    for key in _POSITIVE_KEYS:
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise AdapterFormatError(f"{config_file}: key {key!r}: expected a positive integer, found {value!r}")
    submodules = config.get("num_transformer_submodules", 1)
    if submodules != 1:
        raise AdapterFormatError(f"{config_file}: key 'num_transformer_submodules' = {submodules!r}: deltaw "
                                 "prefix-tunes decoder-only models (expected 1; 2 is an encoder-decoder adapter)")
    if config["token_dim"] % config["num_attention_heads"]:
        raise AdapterFormatError(f"{config_file}: token_dim {config['token_dim']} is not a multiple of "
                                 f"num_attention_heads {config['num_attention_heads']}")
    if set(tensors) != {TENSOR_KEY}:
        raise AdapterFormatError(f"{weights_file}: expected exactly one tensor {TENSOR_KEY!r}, found keys "
                                 f"{sorted(tensors)}")
    prefixes = tensors[TENSOR_KEY]
    expected = [config["num_virtual_tokens"], config["num_layers"] * 2 * config["token_dim"]]
    if list(prefixes.shape) != expected:
        raise AdapterFormatError(
            f"{weights_file}: key {TENSOR_KEY!r} has shape {list(prefixes.shape)}, but {CONFIG_FILE} says "
            f"[num_virtual_tokens, num_layers·2·token_dim] = {expected}; the files do not belong together")
    if not torch.isfinite(prefixes).all():
        raise AdapterFormatError(f"{weights_file}: key {TENSOR_KEY!r} contains NaN or Inf values")
    return PrefixFile(path, config, prefixes)


def check_prefix_fits(model: nn.Module, adapter: PrefixFile, ignore_fingerprint: bool = False) -> None:
    """Raise AdapterFormatError unless the adapter's layers and key/value heads are `model`'s."""
    shape, config = PrefixShape.of_model(model), adapter.config
    found = {"num_layers": shape.num_layers, "num_attention_heads": shape.num_kv_heads, "token_dim": shape.token_dim}
    for key, value in found.items():
        if config[key] != value:
            raise AdapterFormatError(
                f"{adapter.path / CONFIG_FILE}: key {key!r} is {config[key]}, but the model has {value} "
                f"({shape.num_layers} layers, {shape.num_kv_heads} key/value heads of size {shape.head_dim}); "
                "is this adapter for another base model?")
    if not ignore_fingerprint:
        check_fingerprint(model, config, adapter.path / CONFIG_FILE)


@dataclass
class PrefixPlan:
    """A prefix adapter checked against a model: its file and its prefixes [T, layers·2·token_dim] in the
    model's device and dtype."""

    adapter: PrefixFile
    prefixes: torch.Tensor


def plan_prefix(model: nn.Module, adapter: PrefixFile, ignore_fingerprint: bool = False,
                dtype: torch.dtype | None = None) -> PrefixPlan:
    """Check `adapter` against `model` (layers, key/value heads, fingerprint); the prefixes take the model's
    dtype unless `dtype` is given."""
    check_prefix_fits(model, adapter, ignore_fingerprint)
    base = next(model.parameters())
    return PrefixPlan(adapter, adapter.prompt_embeddings.to(base.device, dtype or base.dtype))


def attach_prefix(model: nn.Module, name: str, planned: PrefixPlan, metadata: dict) -> AdapterRecord:
    """Add the planned prefixes to `model` as adapter `name` (not activated)."""
    config = PrefixConfig(num_virtual_tokens=planned.adapter.config["num_virtual_tokens"])
    record = AdapterRecord(kind="prefix", config=config, metadata=metadata)
    add_prefix_tensor(model, name, planned.prefixes, record)
    return record


def save_prefix_adapter(model: nn.Module, name: str, path: str | os.PathLike, metadata: dict) -> Path:
    """Write prefix adapter `name` (its final prefixes, in float32) to `path` in PEFT's layout."""
    record = require_adapter(model, name)
    with torch.no_grad():
        prefixes = prefix_values(model, name).float()
    cfg: PrefixConfig = record.config
    deltaw = {key: value for key, value in record.metadata.items() if key != "fingerprint"}
    deltaw.update(fingerprint=model_fingerprint(model), init=cfg.init,
                  projection_hidden=cfg.projection_hidden if cfg.projection else None,
                  **metadata)
    base_model = getattr(getattr(model, "config", None), "_name_or_path", None)
    config = prefix_config_dict(PrefixShape.of_model(model), prefixes.shape[0], base_model, deltaw)
    write_adapter_files(path, {TENSOR_KEY: prefixes}, config)
    return Path(path)


def prefix_config_dict(shape: PrefixShape, num_virtual_tokens: int, base_model: str | None, deltaw: dict) -> dict:
    """adapter_config.json of a prefix adapter, with the keys PEFT writes."""
    return {
        "peft_type": PREFIX_TUNING,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "num_virtual_tokens": num_virtual_tokens,
        "num_layers": shape.num_layers,
        "token_dim": shape.token_dim,
        "num_attention_heads": shape.num_kv_heads,
        "num_transformer_submodules": 1,
        "encoder_hidden_size": shape.token_dim,
        "prefix_projection": False,
        "init_weights": None,
        "inference_mode": True,
        "modules_to_save": None,
        "deltaw": deltaw,
    }


def describe_prefix_adapter(adapter: PrefixFile) -> str:
    """A human-readable summary of a prefix adapter: geometry, parameters, size, fingerprint."""
    config = adapter.config
    deltaw = deltaw_section(config)
    heads, token_dim = config["num_attention_heads"], config["token_dim"]
    size = size_on_disk(adapter.path)
    lines = [
        f"adapter       {adapter.path}",
        f"type          {PREFIX_TUNING} (trained through a projection: {bool(deltaw.get('projection_hidden'))})",
        f"base model    {config.get('base_model_name_or_path')}",
        f"prefix        {config['num_virtual_tokens']} virtual tokens x {config['num_layers']} layers x key, value x "
        f"{heads} kv heads x {token_dim // heads}",
        f"parameters    {adapter.num_parameters:,} ({str(adapter.prompt_embeddings.dtype).replace('torch.', '')})",
        f"size on disk  {size:,} bytes ({size / 2**20:.2f} MiB)",
        f"fingerprint   {deltaw.get('fingerprint', 'none (not written by deltaw)')}",
    ]
    extra = {k: v for k, v in deltaw.items() if k not in ("fingerprint", "init", "projection_hidden")}
    if extra:
        lines.append(f"metadata      {json.dumps(extra, sort_keys=True)}")
    return "\n".join(lines)
