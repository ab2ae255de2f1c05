"""Export a merged model: base + adapter folded into plain nn.Linear weights, saved as an HF directory."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from deltaw import compat
from deltaw.adapters import merge_adapter
from deltaw.adapters.kinds import all_kinds
from deltaw.adapters.state import adapters_of
from deltaw.models.quantized import dequantize_model


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter from `model`: LoRA layers become plain nn.Linear layers (NF4Linear for a 4-bit
    base) holding their current weight, merged or not. Call merge_adapter first to keep one adapter's
    weight change. Returns the same model object."""
    for kind in all_kinds():
        kind.unload(model)
    adapters_of(model).active = None
    return model


def export_merged(
    model: nn.Module,
    tokenizer: object,
    adapter: str,
    out: str | os.PathLike,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Merge `adapter` into `model`, drop the adapter layers and write an HF model directory to `out`.

    The directory holds config.json, the tokenizer and model.safetensors, and loads with
    `transformers.AutoModelForCausalLM.from_pretrained(out)`. The model object is consumed. An NF4 base is
    dequantized first (see deltaw.models.quantized.merge_into_nf4 and save_quantized for a 4-bit output).
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: exists and is not empty; choose a new directory or pass overwrite=True (--overwrite)")
    dequantize_model(model, torch.float32)  # an NF4 base merges exactly into its dequantized weights
    merge_adapter(model, adapter)
    unload(model)
    compat.mark_untied(model)  # LoRA merged into a tied embedding leaves the head on the original weight
    for param in model.parameters():
        param.requires_grad_(False)
    if dtype is not None:
        model.to(dtype)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out
