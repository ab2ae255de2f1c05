"""`deltaw merge`: an adapter folded into its base model, written as an HF model directory (or an NF4 one)."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from deltaw.adapters import load_adapter
from deltaw.adapters.files import deltaw_section, read_adapter_config
from deltaw.models.export import export_merged, unload
from deltaw.models.loading import BUNDLED_NAME, DTYPES, load_model
from deltaw.models.quantized import merge_into_nf4, prepare_base, quantize_model, save_quantized
from deltaw.quant.linear import quantized_layers
from deltaw.train.data import load_jsonl
from deltaw.train.loop import evaluate


@dataclass
class MergeOptions:
    """What `deltaw merge` merges and where it writes.

    Attributes:
        adapter: the adapter directory (PEFT layout).
        out: the output directory for the merged model.
        model: the base model.
        dtype: the dtype of the saved weights.
        ignore_fingerprint: load the adapter even if it was made for another base model.
        overwrite: write into a non-empty --out directory.
        nf4: merge into the NF4 base and re-quantize (lossy: the error is reported); without it a QLoRA
            adapter merges exactly into the dequantized base, written in --dtype.
        val_data: with --nf4: a JSONL file whose loss is reported before and after the merge.
    """

    adapter: str
    out: str
    model: str = BUNDLED_NAME
    dtype: str = field(default="fp32", metadata={"choices": tuple(DTYPES)})
    ignore_fingerprint: bool = False
    overwrite: bool = False
    nf4: bool = False
    val_data: str | None = None


def merge_to_dir(options: MergeOptions) -> Path:
    """Merge `options.adapter` into its base and write the result; prints what it did. Returns the directory.

    A QLoRA adapter's base is rebuilt as in training (the same load dtype, then the same NF4 layers), so
    the default output is exactly the trained model; --nf4 re-quantizes and reports the error.
    """
    start = time.perf_counter()
    if options.val_data and not options.nf4:
        raise ValueError("--val-data measures the re-quantization of --nf4; add --nf4 or drop --val-data")
    section = deltaw_section(read_adapter_config(options.adapter))
    record = section.get("base_quantization")
    model, tokenizer = load_model(options.model, dtype=DTYPES[record.get("dtype", "fp32")] if record else torch.float32)
    if record:
        prepare_base(model, record)
    elif options.nf4 and not quantized_layers(model):
        print(quantize_model(model))
    load_adapter(model, options.adapter, "merged", ignore_fingerprint=options.ignore_fingerprint)
    if options.nf4:
        return _merge_nf4(model, tokenizer, options, section.get("training", {}).get("seq_len", 512))
    if quantized_layers(model):  # NF4 weights inside LoRA layers included
        print("merged into the dequantized NF4 base" + (" the adapter was trained on: no re-quantization error"
                                                         if record else f" of {options.model}"))
    out = export_merged(model, tokenizer, "merged", options.out, dtype=DTYPES[options.dtype],
                        overwrite=options.overwrite)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"merged {options.adapter} into {options.model} -> {out} ({options.dtype}, {size / 2**20:.1f} MiB, "
          f"{time.perf_counter() - start:.1f} s)")
    print(f"load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return out


def _merge_nf4(model: torch.nn.Module, tokenizer: object, options: MergeOptions, seq_len: int) -> Path:
    """Merge into the NF4 base, re-quantize, report the error, write a quantized model directory."""
    examples = load_jsonl(options.val_data, tokenizer, seq_len=seq_len).examples if options.val_data else []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def val_loss() -> float:
        return evaluate(model, examples, 8, pad_id, contextlib.nullcontext())

    print(merge_into_nf4(model, "merged", val_loss if examples else None))
    unload(model)
    out = save_quantized(model, tokenizer, options.out, overwrite=options.overwrite)
    print(f"merged {options.adapter} into the NF4 base -> {out} (load it with deltaw.load_model({str(out)!r}))")
    return out
