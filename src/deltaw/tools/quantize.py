"""`deltaw quantize`: a model's linear layers stored as NF4, written as a directory every loader reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from deltaw.adapters.targets import ALL_LINEAR
from deltaw.models.loading import BUNDLED_NAME, DTYPES, load_model
from deltaw.models.quantized import quantize_model, save_quantized


@dataclass
class QuantizeOptions:
    """What `deltaw quantize` stores as NF4, and how.

    Attributes:
        out: the output directory (loads with --model DIR everywhere).
        model: the model to quantize.
        targets: 'all-linear' or regexes (full-matched) of the modules to quantize.
        exclude: regexes of modules to keep in float.
        blocksize: values per absmax.
        double_quant: the quantization of the absmax values too (4.127 bits a weight; without it 4.5).
        dtype: the compute dtype, and the dtype of the weights left in float.
        overwrite: write into a non-empty --out directory.
    """

    out: str
    model: str = BUNDLED_NAME
    targets: list[str] = field(default_factory=lambda: [ALL_LINEAR])
    exclude: list[str] = field(default_factory=list)
    blocksize: int = 64
    double_quant: bool = field(default=True, metadata={"negate": "--no-double-quant"})
    dtype: str = field(default="bf16", metadata={"choices": tuple(DTYPES)})
    overwrite: bool = False


def quantize_to_dir(options: QuantizeOptions) -> Path:
    """Quantize `options.model` and write it to `options.out`; prints what it did. Returns the directory."""
    model, tokenizer = load_model(options.model, dtype=DTYPES[options.dtype])
    print(quantize_model(model, options.targets, options.exclude, options.blocksize, options.double_quant))
    out = save_quantized(model, tokenizer, options.out, overwrite=options.overwrite)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"-> {out} ({size / 2**20:.1f} MiB on disk); train on it with `deltaw train --model {out}`")
    return out
