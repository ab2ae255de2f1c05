"""A short identity of a base model, stored in adapter files so an adapter is not loaded on the wrong base.

Three parts, each compared on load:
- architecture: the model class and the config numbers that fix tensor shapes;
- shapes: a hash of every linear layer's name and shape;
- weights: a hash of 4,096 evenly spaced input-embedding values rounded to bf16, from the unmerged
  embedding (an adapter layer's `base_weight()`: LoRA on the embedding and trainable token rows merge
  into it). The embedding is never quantized, so the hash is the same for fp32, bf16 and 4-bit loads of
  one checkpoint, merged or not, and differs between checkpoints of one architecture.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from deltaw.adapters.targets import linear_modules

_SAMPLE = 4096
_CONFIG_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


_PINNED = "_deltaw_fingerprint"


def model_fingerprint(model: nn.Module) -> dict[str, str]:
    """{"architecture": ..., "shapes": ..., "weights": ...} for `model` (see the module docstring)."""
    pinned = model.__dict__.get(_PINNED)
    if pinned is not None:
        return dict(pinned)
    config = getattr(model, "config", None)
    numbers = [f"{key}={getattr(config, key, None)}" for key in _CONFIG_FIELDS] if config is not None else []
    architecture = ",".join([type(model).__name__, *numbers])
    shapes = "\n".join(
        f"{name}:{module.out_features}x{module.in_features}" for name, module in linear_modules(model).items()
    )
    return {"architecture": architecture, "shapes": _short_hash(shapes.encode()), "weights": _weights_hash(model)}


def pin_fingerprint(model: nn.Module) -> dict[str, str]:
    """Take `model`'s fingerprint now and report it from then on: for a model about to be sharded across
    processes (FSDP), where no rank holds the whole embedding any more. Returns the fingerprint."""
    model.__dict__.pop(_PINNED, None)
    model.__dict__[_PINNED] = model_fingerprint(model)
    return dict(model.__dict__[_PINNED])


def fingerprint_mismatch(expected: dict[str, str], found: dict[str, str]) -> list[str]:
    """The fingerprint parts that differ, as readable lines (empty when they agree)."""
    return [
        f"{part}: adapter has {expected.get(part)!r}, model has {found.get(part)!r}"
        for part in ("architecture", "shapes", "weights")
        if part in expected and expected.get(part) != found.get(part)
    ]


def _weights_hash(model: nn.Module) -> str:
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    if embeddings is None or not hasattr(embeddings, "weight"):
        return "none"
    base_weight = getattr(embeddings, "base_weight", None)  # an adapter layer: its weight may hold a merge
    weight = base_weight() if callable(base_weight) else embeddings.weight
    flat = weight.detach().reshape(-1)
    count = min(_SAMPLE, flat.numel())
    index = torch.arange(count, device=flat.device) * (flat.numel() - 1) // max(count - 1, 1)
    sample = flat[index].to(torch.bfloat16).view(torch.int16).cpu()
    return _short_hash(sample.numpy().tobytes())


def _short_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]
