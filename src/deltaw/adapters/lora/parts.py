"""The parts of a LORA file beyond linear (A, B) pairs: DoRA magnitudes, trainable token rows, PEFT's base copies.

Each is checked against adapter_config.json when the file is read (`check_parts`), then against the model
(`planned_magnitude`, `plan_tokens`, `check_base_copies`), and finally attached or collected for saving:

    use_dora: true               every adapted module has `<module>.lora_magnitude_vector` [out] (linear layers;
                                 DoRA on an embedding is refused)
    trainable_token_indices      [ids] (the input embedding) or {module: [ids]}; `<module>.token_adapter.
                                 trainable_tokens_delta` [n, dim] holds the rows, in the order of the ids
    <module>.base_layer.weight   PEFT's copy of a targeted embedding or head: must equal the model's weight (up
                                 to bf16 rounding); a resized or retrained copy is refused, not loaded silently
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from deltaw.adapters.files import CONFIG_FILE, KEY_PREFIX, WEIGHTS_FILE, AdapterFormatError
from deltaw.adapters.lora.embedding import LoRAEmbedding
from deltaw.adapters.lora.inject import adapter_layers, wrap_embedding, wrap_tied_head
from deltaw.adapters.lora.layer import LoRALinear
from deltaw.adapters.lora.layout import MAGNITUDE, TOKENS, AdapterFile
from deltaw.adapters.targets import input_embedding
from deltaw.quant.nf4 import NF4Weight


# --------------------------------------------------------------------------------------------- reading
def check_parts(adapter: AdapterFile) -> None:
    """DoRA magnitudes and token rows agree with the config (no model needed); AdapterFormatError otherwise."""
    weights_file = adapter.path / WEIGHTS_FILE
    use_dora = bool(adapter.config.get("use_dora", False))
    for module in adapter.weights:
        if use_dora and module not in adapter.magnitudes:
            raise AdapterFormatError(f"{weights_file}: missing key '{KEY_PREFIX}{module}.{MAGNITUDE}': {CONFIG_FILE} "
                                     "says use_dora=true, so every adapted module needs its magnitude vector")
    for module in adapter.magnitudes:
        if not use_dora:
            raise AdapterFormatError(f"{weights_file}: key '{KEY_PREFIX}{module}.{MAGNITUDE}' is a DoRA magnitude but "
                                     f"{CONFIG_FILE} says use_dora=false; set use_dora to true or remove the key")
        if module not in adapter.weights:
            raise AdapterFormatError(f"{weights_file}: key '{KEY_PREFIX}{module}.{MAGNITUDE}' has no lora_A/lora_B "
                                     "pair for its module")
        if module in adapter.embeddings:
            raise AdapterFormatError(f"{weights_file}: key '{KEY_PREFIX}{module}.{MAGNITUDE}': DoRA on an embedding "
                                     f"({module!r}) is not supported by deltaw (DoRA applies to linear layers); "
                                     "merge it with PEFT, or retrain the embedding with plain LoRA or trainable tokens")
    indices = token_indices(adapter)
    for module, rows in adapter.tokens.items():
        if rows.ndim != 2 or rows.shape[0] != len(indices[module]) or not torch.isfinite(rows).all():
            raise AdapterFormatError(f"{weights_file}: key '{KEY_PREFIX}{module}.{TOKENS}' is {list(rows.shape)}: "
                                     f"expected [{len(indices[module])}, dim] finite rows, one per id of "
                                     f"trainable_token_indices {indices[module]}")


def token_indices(adapter: AdapterFile) -> dict[str, list[int]]:
    """The token ids of each module with token rows in the file, from the config's trainable_token_indices
    (a list names the input embedding's rows; a dict maps a module name, or its last part, to ids)."""
    config_file, weights_file = adapter.path / CONFIG_FILE, adapter.path / WEIGHTS_FILE
    given = adapter.config.get("trainable_token_indices")
    if not given:
        if adapter.tokens:
            module = next(iter(adapter.tokens))
            raise AdapterFormatError(f"{weights_file}: key '{KEY_PREFIX}{module}.{TOKENS}' holds token rows but "
                                     f"{CONFIG_FILE} has no trainable_token_indices naming their ids")
        return {}
    if isinstance(given, list):
        given = {"": given}
    if not isinstance(given, dict) or not all(_ids(ids) for ids in given.values()):
        raise AdapterFormatError(f"{config_file}: key 'trainable_token_indices': expected a list of distinct token "
                                 f"ids or {{module: [ids]}}, found {given!r}")
    mapped = {}
    for key, ids in given.items():
        modules = [m for m in adapter.tokens if not key or m == key or m.endswith("." + key)]
        if len(modules) != 1:
            raise AdapterFormatError(f"{weights_file}: trainable_token_indices {key or 'list'} {ids} needs exactly one "
                                     f"'{KEY_PREFIX}<module>.{TOKENS}' key, found {len(modules)}")
        mapped[modules[0]] = list(ids)
    return mapped


def _ids(ids: object) -> bool:
    return (isinstance(ids, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in ids)
            and len(set(ids)) == len(ids) and bool(ids))


def token_ids_of(config: dict) -> tuple[int, ...]:
    """The trainable token ids an adapter_config.json names (for the adapter's LoRAConfig record)."""
    given = config.get("trainable_token_indices") or []
    return tuple(given if isinstance(given, list) else [i for ids in given.values() for i in ids])


# --------------------------------------------------------------------------------------------- planning
@dataclass
class PlannedTokens:
    """Trainable token rows checked against the model: rows `indices` of embedding `module` become `values`."""

    module: str
    indices: list[int]
    values: torch.Tensor


def planned_magnitude(adapter: AdapterFile, module: str, fan_out: int, like: dict) -> torch.Tensor | None:
    """The module's DoRA magnitude [out] checked and converted (`like`: device and dtype), or None."""
    magnitude = adapter.magnitudes.get(module)
    if magnitude is None:
        return None
    key = f"{KEY_PREFIX}{module}.{MAGNITUDE}"
    if tuple(magnitude.shape) != (fan_out,):
        raise AdapterFormatError(f"{adapter.path / WEIGHTS_FILE}: shape mismatch for '{key}': expected [{fan_out}], "
                                 f"found {list(magnitude.shape)}")
    if not torch.isfinite(magnitude).all():
        raise AdapterFormatError(f"{adapter.path / WEIGHTS_FILE}: key '{key}' contains NaN or Inf values")
    return magnitude.to(**like)


def plan_tokens(model: nn.Module, adapter: AdapterFile, dtype: torch.dtype | None) -> list[PlannedTokens]:
    """The file's token rows checked against `model`: rows of its input embedding, ids in range, right width."""
    where, embedding_name = adapter.path / WEIGHTS_FILE, input_embedding(model)
    planned = []
    for module, indices in token_indices(adapter).items():
        if module != embedding_name:
            raise AdapterFormatError(f"{where}: key '{KEY_PREFIX}{module}.{TOKENS}': deltaw trains token rows of the "
                                     f"input embedding ({embedding_name!r}) only, and a tied head follows them")
        embedding = model.get_submodule(module)
        rows = adapter.tokens[module]
        if max(indices) >= embedding.num_embeddings or min(indices) < 0 or rows.shape[1] != embedding.embedding_dim:
            raise AdapterFormatError(f"{where}: token rows {list(rows.shape)} for ids {indices} do not fit "
                                     f"{module!r} [{embedding.num_embeddings}, {embedding.embedding_dim}]; is this "
                                     "adapter for another base model (or a resized vocabulary)?")
        planned.append(PlannedTokens(module, indices, rows.to(embedding.weight.device, dtype or embedding.weight.dtype)))
    return planned


def check_base_copies(model: nn.Module, adapter: AdapterFile) -> None:
    """PEFT's saved copies of targeted embeddings and heads must equal the model's weights (to bf16 rounding)."""
    where = adapter.path / WEIGHTS_FILE
    for module, copy in adapter.base_copies.items():
        key = f"{KEY_PREFIX}{module}.base_layer.weight"
        try:
            layer = model.get_submodule(module)
        except AttributeError:
            raise AdapterFormatError(f"{where}: key '{key}' names {module!r}, which is not a module of this model") from None
        weight = layer.base_weight() if hasattr(layer, "base_weight") else layer.weight
        weight = weight.dequantize(torch.float32) if isinstance(weight, NF4Weight) else weight.detach()
        if tuple(copy.shape) != tuple(weight.shape):
            raise AdapterFormatError(f"{where}: key '{key}' is {list(copy.shape)} but the model's weight is "
                                     f"{list(weight.shape)}: the adapter was trained on a resized vocabulary; resize "
                                     "the model's embeddings (and tokenizer) the same way first")
        if not torch.allclose(copy.float(), weight.float().to(copy.device), rtol=2**-7, atol=1e-6):
            raise AdapterFormatError(f"{where}: key '{key}' holds another version of {module!r}'s weight than this "
                                     "model's (PEFT saves it when the vocabulary was changed); deltaw adapters do not "
                                     "replace base weights: load the model the adapter was trained on")


# --------------------------------------------------------------------------------------------- attaching, saving
def attach_tokens(model: nn.Module, name: str, tokens: list[PlannedTokens]) -> None:
    """Add checked token rows to the model's embedding as adapter `name` (a tied head follows them)."""
    for planned in tokens:
        embedding = wrap_embedding(model, planned.module)
        embedding.add_tokens(name, planned.indices, planned.values)
        wrap_tied_head(model, embedding)


@dataclass
class SavedParts:
    """Adapter `name`'s tensors as the files hold them, collected from the model's layers."""

    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    embeddings: set[str] = field(default_factory=set)
    ranks: dict[str, int] = field(default_factory=dict)
    scalings: dict[str, float] = field(default_factory=dict)
    magnitudes: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: dict[str, torch.Tensor] = field(default_factory=dict)
    token_indices: list[int] | None = None


def saved_parts(model: nn.Module, name: str) -> SavedParts:
    """Collect adapter `name` from the model's LoRALinear and LoRAEmbedding layers (a TokenHead holds nothing)."""
    parts = SavedParts()
    for module, layer in adapter_layers(model):
        if not layer.has(name):
            continue
        if isinstance(layer, LoRALinear):
            parts.weights[module] = (layer.lora_A[name], layer.lora_B[name])
            if layer.is_dora(name):
                parts.magnitudes[module] = layer.lora_magnitude[name]
        elif isinstance(layer, LoRAEmbedding) and name in layer.token_indices:
            parts.tokens[module], parts.token_indices = layer.token_values[name], layer.token_indices[name]
            continue
        elif isinstance(layer, LoRAEmbedding):
            parts.weights[module] = (layer.lora_embedding_A[name], layer.lora_embedding_B[name])
            parts.embeddings.add(module)
        else:
            continue
        parts.ranks[module], parts.scalings[module] = parts.weights[module][0].shape[0], layer.scaling[name]
    return parts


def describe_parts(adapter: AdapterFile) -> Iterator[str]:
    """`deltaw inspect` lines for DoRA, embedding pairs and token rows."""
    if adapter.magnitudes:
        yield f"dora          magnitude vectors on {len(adapter.magnitudes)} modules (use_dora: true)"
    if adapter.embeddings:
        yield f"embeddings    LoRA on {sorted(adapter.embeddings)} (lora_embedding_A/B)"
    for module, ids in token_indices(adapter).items():
        yield f"tokens        {len(ids)} trainable rows of {module} (and of a tied head): ids {ids}"
