"""PEFT's tensor keys in a LORA adapter file, parsed into an AdapterFile and written back.

    base_model.model.<module>.lora_A.weight                      [r, in]      linear layers
    base_model.model.<module>.lora_B.weight                      [out, r]
    base_model.model.<module>.lora_magnitude_vector              [out]        DoRA (use_dora: true)
    base_model.model.<module>.lora_embedding_A                   [r, vocab]   embeddings
    base_model.model.<module>.lora_embedding_B                   [dim, r]
    base_model.model.<module>.token_adapter.trainable_tokens_delta  [n, dim]  trainable_token_indices: the rows
    base_model.model.<module>.base_layer.weight                  PEFT's copy of a targeted embedding or head
                                                                  (read and checked against the model; not written)

An embedding's pair is stored with the linear orientation (A [r, in = vocab], B [out = dim, r]), so code that
works on B·A products (resize, combine) treats both alike.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from deltaw.adapters.files import KEY_PREFIX, AdapterFormatError

_KEY = re.compile(
    r"base_model\.model\.(?P<module>.+?)\.(?:"
    r"lora_(?P<part>[AB])\.weight|lora_embedding_(?P<embedding>[AB])|(?P<magnitude>lora_magnitude_vector)(?:\.weight)?"
    r"|(?P<tokens>token_adapter\.trainable_tokens_delta)|(?P<base>base_layer\.weight))"
)
MAGNITUDE = "lora_magnitude_vector"
TOKENS = "token_adapter.trainable_tokens_delta"


@dataclass
class AdapterFile:
    """A parsed LoRA adapter directory.

    Attributes:
        path: the directory.
        config: adapter_config.json as a dict.
        weights: module path -> (A [r, in], B [out, r]), as stored (an embedding's: A [r, vocab], B [dim, r]).
        embeddings: the modules of `weights` stored as embeddings (lora_embedding_A/B).
        magnitudes: DoRA: module path -> m [out].
        tokens: module path -> the trained rows V [n, dim] of trainable_token_indices (in the config's order).
        base_copies: module path -> PEFT's copy of that module's base weight.
    """

    path: Path
    config: dict
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    embeddings: set[str] = field(default_factory=set)
    magnitudes: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: dict[str, torch.Tensor] = field(default_factory=dict)
    base_copies: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_parameters(self) -> int:
        pairs = sum(a.numel() + b.numel() for a, b in self.weights.values())
        return pairs + sum(t.numel() for t in [*self.magnitudes.values(), *self.tokens.values()])

    @property
    def is_dora(self) -> bool:
        return bool(self.magnitudes)


def parse_tensors(path: Path, config: dict, tensors: dict[str, torch.Tensor], weights_file: Path) -> AdapterFile:
    """Group PEFT's keys by module (see the module docstring); any other key is an error naming it."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    adapter = AdapterFile(path, config, {})
    for key, tensor in tensors.items():
        if not key.startswith(KEY_PREFIX):
            raise AdapterFormatError(
                f"{weights_file}: key {key!r} has the wrong prefix: expected keys like "
                f"'{KEY_PREFIX}<module path>.lora_A.weight' (PEFT's layout)"
            )
        match = _KEY.fullmatch(key)
        if match is None:
            raise AdapterFormatError(
                f"{weights_file}: unexpected key {key!r}: expected '{KEY_PREFIX}<module path>.' followed by "
                f"'lora_A.weight', 'lora_B.weight', 'lora_embedding_A', 'lora_embedding_B', '{MAGNITUDE}' or "
                f"'{TOKENS}' (LoRA biases and modules_to_save copies are not supported)"
            )
        module = match["module"]
        if match["magnitude"]:
            adapter.magnitudes[module] = tensor
        elif match["tokens"]:
            adapter.tokens[module] = tensor
        elif match["base"]:
            adapter.base_copies[module] = tensor
        else:
            if match["embedding"]:
                adapter.embeddings.add(module)
            pairs.setdefault(module, {})[match["part"] or match["embedding"]] = tensor
    adapter.weights = _paired(pairs, adapter.embeddings, weights_file)
    if not adapter.weights and not adapter.tokens:
        raise AdapterFormatError(f"{weights_file}: holds no LoRA tensors")
    return adapter


def _paired(parts: dict[str, dict[str, torch.Tensor]], embeddings: set[str],
            weights_file: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (A, B); a module with only one of the two is an error naming the missing key."""
    weights = {}
    for module, pair in parts.items():
        for part in "AB":
            if part not in pair:
                raise AdapterFormatError(f"{weights_file}: missing key '{KEY_PREFIX}{module}."
                                         f"{pair_key(module in embeddings, part)}'")
        weights[module] = (pair["A"], pair["B"])
    return weights


def pair_key(embedding: bool, part: str) -> str:
    """The key suffix of factor `part` ("A" or "B") of a linear layer or an embedding."""
    return f"lora_embedding_{part}" if embedding else f"lora_{part}.weight"


def adapter_tensors(weights: dict[str, tuple[torch.Tensor, torch.Tensor]], embeddings: set[str] = frozenset(),
                    magnitudes: dict[str, torch.Tensor] | None = None,
                    tokens: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """PEFT's keys for module -> (A, B) pairs (embeddings among them), DoRA magnitudes and token rows."""
    tensors = {}
    for module, (lora_a, lora_b) in weights.items():
        tensors[f"{KEY_PREFIX}{module}.{pair_key(module in embeddings, 'A')}"] = lora_a
        tensors[f"{KEY_PREFIX}{module}.{pair_key(module in embeddings, 'B')}"] = lora_b
    for module, magnitude in (magnitudes or {}).items():
        tensors[f"{KEY_PREFIX}{module}.{MAGNITUDE}"] = magnitude
    for module, rows in (tokens or {}).items():
        tensors[f"{KEY_PREFIX}{module}.{TOKENS}"] = rows
    return tensors
