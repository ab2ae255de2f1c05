"""LoRA adapters as llama.cpp's adapter GGUF files: written for llama-server / Ollama, read back from them.

    KV  general.architecture   "llama" (must equal the base model GGUF's)
        general.type           "adapter"
        adapter.type           "lora"
        adapter.lora.alpha     α (float32): llama.cpp scales each pair by α / r_pair
        deltaw.metadata        deltaw's own facts (fingerprint, training record) as JSON; llama.cpp ignores it
    tensors  <base tensor>.lora_a [r, in], <base tensor>.lora_b [out, r]    (gguf_layout.py has the names)
             token_embd.weight.lora_a [vocab, r], .lora_b [dim, r]           a LoRA on an untied embedding

deltaw's scaling may differ per module (rsLoRA's α/√r, rank_pattern, alpha_pattern) where llama.cpp has
one α. Writing folds the difference into B: B' = B · scaling · r / α, so llama.cpp's α/r·B'·A equals
deltaw's scaling·B·A in every layer (for a plain adapter the factor is exactly 1 and B is written as is).
Reading gives each module llama.cpp's own scale (α / r, or 1 when the file has no α).

An embedding's pair is stored as llama.cpp's converter writes it: A transposed ([vocab, r], whose rows
llama.cpp gathers per token), B as is; llama.cpp adds s·B·A[:, token] to the input embedding, as deltaw
and PEFT do. Only an untied embedding is written: where the output head is the embedding's own tensor,
llama.cpp would apply the pair to the head as well, where its shapes do not fit.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

from deltaw.adapters.files import AdapterFormatError, deltaw_section
from deltaw.adapters.lora.files import AdapterFile, lora_config_dict, module_scaling
from deltaw.adapters.lora.gguf_layout import (
    ARCHITECTURES,
    EMBEDDING_MODULE,
    GGUFArchitecture,
    architecture_for,
    from_llamacpp_rows,
    module_path,
    rope_heads,
    tensor_name,
    to_llamacpp_rows,
)

GENERAL_ARCHITECTURE = "general.architecture"
GENERAL_TYPE = "general.type"
ADAPTER_TYPE = "adapter.type"
LORA_ALPHA = "adapter.lora.alpha"
DELTAW_METADATA = "deltaw.metadata"
OUTTYPES = ("f32", "f16", "bf16")
SUFFIXES = (".lora_a", ".lora_b")


@dataclass
class GGUFReport:
    """What `write_gguf` wrote.

    Attributes:
        path: the file.
        architecture: llama.cpp's architecture name.
        alpha: the file's adapter.lora.alpha.
        pairs: LoRA pairs (adapted modules) written.
        folded: modules whose scaling differs from α/r and was folded into lora_b.
        outtype: the tensors' type.
        size: bytes on disk.
    """

    path: Path
    architecture: str
    alpha: float
    pairs: int
    folded: int
    outtype: str
    size: int

    def __str__(self) -> str:
        folded = f"; {self.folded} modules' scaling folded into lora_b" if self.folded else ""
        return (f"wrote {self.pairs} LoRA pairs ({self.architecture}, alpha {self.alpha:g}, {self.outtype}) to "
                f"{self.path} ({self.size / 2**20:.2f} MiB){folded}")


# --------------------------------------------------------------------------------------------- writing
def write_gguf(adapter: AdapterFile, base_config: object, out: str | os.PathLike, outtype: str = "f32") -> GGUFReport:
    """Write `adapter` as a llama.cpp LoRA GGUF for a base model with transformers config `base_config`.

    `base_config` gives `model_type` (the architecture) and the head counts that fix the q/k row order.
    The file is written to a temporary name and renamed into place.
    """
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype must be one of {OUTTYPES}, found {outtype!r}")
    model_type = getattr(base_config, "model_type", None)
    try:
        arch = architecture_for(model_type)
    except ValueError as exc:
        raise AdapterFormatError(f"{adapter.path}: {exc}") from None
    _check_exportable(adapter, base_config, arch)
    alpha = float(adapter.config["lora_alpha"])
    tensors, folded = {}, 0
    for module, (lora_a, lora_b) in adapter.weights.items():
        name = _gguf_name(adapter, module, arch)
        rank = lora_a.shape[0]
        factor = module_scaling(adapter.config, module, rank) * rank / alpha
        lora_b = lora_b.float() * factor  # exactly B when factor is 1
        folded += factor != 1.0
        heads = rope_heads(name, base_config) if arch.permute_qk else None
        if heads is not None:
            lora_b = to_llamacpp_rows(_check_heads(adapter, module, lora_b, heads), heads)
        if module in adapter.embeddings:
            lora_a = lora_a.T
        tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"] = lora_a.float(), lora_b
    metadata = json.dumps(deltaw_section(adapter.config), sort_keys=True)
    _write(Path(out), arch.name, alpha, tensors, outtype, adapter.path.name, metadata)
    return GGUFReport(Path(out), arch.name, alpha, len(adapter.weights), folded, outtype, Path(out).stat().st_size)


def _check_exportable(adapter: AdapterFile, base_config: object, arch: GGUFArchitecture) -> None:
    """Refuse the parts of a LoRA file that llama.cpp's adapter format cannot hold."""
    tied = getattr(base_config, "tie_word_embeddings", True) or not arch.untied_output
    parts = [(adapter.magnitudes, "DoRA magnitudes (use_dora)", "merge it into the base (deltaw merge) and "
              "convert the merged model"),
             (adapter.tokens, "trainable token rows", "merge it into the base (deltaw merge) and convert the "
              "merged model"),
             (adapter.embeddings if tied else (), "a LoRA on an embedding tied to the output head (llama.cpp "
              "would apply it to the head too)", "retrain without the embedding in --target, or merge it "
              "(deltaw merge) and convert the merged model"),
             (adapter.base_copies, "copies of base modules (modules_to_save)", "merge it and convert the merged "
              "model")]
    for present, what, fix in parts:
        if present:
            raise AdapterFormatError(f"{adapter.path}: llama.cpp's LoRA GGUF cannot hold {what} "
                                     f"({', '.join(sorted(present)[:3])}); {fix}")


def _gguf_name(adapter: AdapterFile, module: str, arch: GGUFArchitecture) -> str:
    name = tensor_name(module, arch)
    if name is None:
        raise AdapterFormatError(
            f"{adapter.path}: module {module!r} has no tensor in llama.cpp's {arch.name} layout (it maps the "
            "decoder layers' attention and MLP projections, and an untied lm_head); retrain without it "
            "(--exclude) to export"
        )
    return name


def _check_heads(adapter: AdapterFile, module: str, lora_b: torch.Tensor, heads: int) -> torch.Tensor:
    if lora_b.shape[0] % (2 * heads):
        raise AdapterFormatError(f"{adapter.path}: {module!r} has {lora_b.shape[0]} output rows, not a multiple of "
                                 f"2 x {heads} heads: the base model config does not belong to this adapter")
    return lora_b


def _write(out: Path, arch: str, alpha: float, tensors: dict[str, torch.Tensor], outtype: str, name: str,
           metadata: str) -> None:
    writer = gguf.GGUFWriter(None, arch)
    writer.add_string(GENERAL_TYPE, "adapter")
    writer.add_string(ADAPTER_TYPE, "lora")
    writer.add_float32(LORA_ALPHA, alpha)
    writer.add_string("general.name", name)
    writer.add_uint32("general.quantization_version", gguf.GGML_QUANT_VERSION)
    writer.add_string(DELTAW_METADATA, metadata)
    for tensor_name_, tensor in tensors.items():
        data, raw = _encode(tensor_name_, tensor, outtype)
        writer.add_tensor(tensor_name_, data, raw_dtype=raw)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.tmp")
    try:
        writer.write_header_to_file(staging)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(staging, out)
    finally:
        staging.unlink(missing_ok=True)


def _encode(name: str, tensor: torch.Tensor, outtype: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType | None]:
    """The numpy array gguf writes for `tensor` in `outtype` (bf16 as raw 16-bit words)."""
    tensor = tensor.detach().cpu().contiguous()
    if outtype == "bf16":
        return tensor.to(torch.bfloat16).view(torch.int16).numpy(), gguf.GGMLQuantizationType.BF16
    if outtype == "f16":
        if tensor.abs().max() > torch.finfo(torch.float16).max:
            raise ValueError(f"{name} has values beyond float16's range; export with --outtype f32 or bf16")
        return tensor.to(torch.float16).numpy(), None
    return tensor.numpy(), None


# --------------------------------------------------------------------------------------------- reading
@dataclass
class GGUFAdapterFile(AdapterFile):
    """A llama.cpp LoRA GGUF read into deltaw's form: `config` is the PEFT config it amounts to and `weights`
    hold lora_b in the file's row order. `for_model` puts q/k rows back in transformers' order.

    Attributes:
        architecture: the file's general.architecture.
        alpha: the file's adapter.lora.alpha (0: none, llama.cpp then scales by 1).
        tensor_types: the GGML types of the file's tensors (e.g. ("F32",)).
    """

    architecture: str = ""
    alpha: float = 0.0
    tensor_types: tuple[str, ...] = ()

    def for_model(self, model: nn.Module) -> AdapterFile:
        """The adapter with B in `model`'s row order; AdapterFormatError if it was made for another architecture."""
        model_config = getattr(model, "config", None)
        model_type = getattr(model_config, "model_type", None)
        arch = ARCHITECTURES.get(model_type)
        if arch is None or arch.name != self.architecture:
            expected = arch.name if arch else f"none (model_type {model_type!r} has no llama.cpp layout in deltaw)"
            raise AdapterFormatError(f"{self.path}: key '{GENERAL_ARCHITECTURE}': the model's llama.cpp "
                                     f"architecture is {expected}, the adapter's is {self.architecture!r}: load it "
                                     "on its base model")
        weights = {}
        for module, (lora_a, lora_b) in self.weights.items():
            heads = rope_heads(tensor_name(module), model_config) if arch.permute_qk else None
            if heads is not None and lora_b.shape[0] % (2 * heads) == 0:  # else plan_load reports the shape
                lora_b = from_llamacpp_rows(lora_b, heads)
            weights[module] = (lora_a, lora_b)
        return AdapterFile(path=self.path, config=self.config, weights=weights, embeddings=set(self.embeddings))


def is_gguf(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() == ".gguf"


def read_gguf_adapter(path: str | os.PathLike) -> GGUFAdapterFile:
    """Read and check a llama.cpp LoRA GGUF on its own (no model needed)."""
    path = Path(path)
    if not path.is_file():
        raise AdapterFormatError(f"{path}: no such file")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError) as exc:
        raise AdapterFormatError(f"{path}: truncated or corrupt GGUF file ({exc}); export or copy it again") from exc
    fields = {name: _field_value(value) for name, value in reader.fields.items()}
    _check_kv(path, fields, GENERAL_TYPE, "adapter", "a base model GGUF loads with deltaw.load_model, not as adapter")
    _check_kv(path, fields, ADAPTER_TYPE, "lora", "deltaw reads llama.cpp's LoRA adapters")
    architecture = fields.get(GENERAL_ARCHITECTURE)
    if architecture not in {arch.name for arch in ARCHITECTURES.values()}:
        known = sorted({arch.name for arch in ARCHITECTURES.values()})
        raise AdapterFormatError(f"{path}: key '{GENERAL_ARCHITECTURE}': expected one of {known}, "
                                 f"found {architecture!r}")
    alpha = float(fields.get(LORA_ALPHA) or 0.0)
    weights = _pair_tensors(path, {tensor.name: tensor for tensor in reader.tensors})
    embeddings = {EMBEDDING_MODULE} & set(weights)
    types = tuple(sorted({tensor.tensor_type.name for tensor in reader.tensors}))
    ranks = {module: a.shape[0] for module, (a, _) in weights.items()}
    config = lora_config_dict(
        ranks=ranks,
        scalings={module: alpha / rank if alpha else 1.0 for module, rank in ranks.items()},  # llama.cpp's rule
        target_modules="|".join(re.escape(module) for module in sorted(weights)),
        deltaw=_metadata(path, fields.get(DELTAW_METADATA)),
    )
    return GGUFAdapterFile(path=path, config=config, weights=weights, embeddings=embeddings,
                           architecture=architecture, alpha=alpha, tensor_types=types)


def describe_gguf(adapter: GGUFAdapterFile) -> str:
    """A human-readable summary of a llama.cpp LoRA GGUF: architecture, alpha, ranks, modules, size, fingerprint."""
    ranks = Counter(a.shape[0] for a, _ in adapter.weights.values())
    leaves = Counter(tensor_name(module).split(".")[-2] for module in adapter.weights)
    size = adapter.path.stat().st_size
    section = deltaw_section(adapter.config)
    lines = [
        f"adapter       {adapter.path}",
        f"type          llama.cpp LoRA GGUF (architecture {adapter.architecture}, {LORA_ALPHA} {adapter.alpha:g})",
        f"rank          per-layer ranks {dict(sorted(ranks.items()))}",
        f"modules       {len(adapter.weights)} ({', '.join(f'{k}: {v}' for k, v in sorted(leaves.items()))})",
        f"parameters    {adapter.num_parameters:,} ({', '.join(adapter.tensor_types)})",
        f"size on disk  {size:,} bytes ({size / 2**20:.2f} MiB)",
        f"fingerprint   {section.get('fingerprint', 'none (not written by deltaw)')}",
    ]
    return "\n".join(lines)


def _field_value(value: gguf.ReaderField) -> object:
    """A scalar or string KV's value (None for arrays, which deltaw does not read)."""
    kind = value.types[0] if value.types else None
    if kind == gguf.GGUFValueType.STRING:
        return bytes(value.parts[value.data[0]]).decode("utf-8", errors="replace")
    if kind is None or kind == gguf.GGUFValueType.ARRAY:
        return None
    return value.parts[value.data[0]][0].item()


def _check_kv(path: Path, fields: dict, key: str, expected: str, hint: str) -> None:
    if fields.get(key) != expected:
        raise AdapterFormatError(f"{path}: key {key!r}: expected {expected!r}, found {fields.get(key)!r} ({hint})")


def _metadata(path: Path, text: object) -> dict:
    if text is None:
        return {}
    try:
        section = json.loads(str(text))
    except json.JSONDecodeError as exc:
        raise AdapterFormatError(f"{path}: key {DELTAW_METADATA!r} is not valid JSON ({exc})") from exc
    return section if isinstance(section, dict) else {}


def _pair_tensors(path: Path, tensors: dict[str, object]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module path -> (A [r, in], B [out, r]) as float32, from `<base tensor>.lora_a/.lora_b` pairs (the
    embedding's A stored transposed, [vocab, r], comes back as [r, vocab])."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        base, suffix = name[:-7], name[-7:]
        module = module_path(base) if suffix in SUFFIXES else None
        if module is None:
            raise AdapterFormatError(
                f"{path}: tensor {name!r} is not a LoRA pair deltaw reads: expected '<base tensor>.lora_a' or "
                "'.lora_b' on a decoder layer's attention or MLP projection, on 'output.weight' or on "
                "'token_embd.weight' (norm vectors are not supported)"
            )
        pairs.setdefault(module, {})[suffix] = _tensor_data(path, name, tensor)
    if not pairs:
        raise AdapterFormatError(f"{path}: holds no LoRA tensors")
    weights = {}
    for module, pair in pairs.items():
        base = tensor_name(module)
        for suffix in SUFFIXES:
            if suffix not in pair:
                raise AdapterFormatError(f"{path}: tensor '{base}{suffix}' is missing (LoRA tensors come in pairs)")
        lora_a, lora_b = pair[".lora_a"], pair[".lora_b"]
        embedding = module == EMBEDDING_MODULE
        shapes = f"'{base}.lora_a' {list(lora_a.shape)} and '.lora_b' {list(lora_b.shape)}"
        if embedding and lora_a.ndim == 2:
            lora_a = lora_a.T.contiguous()
        if lora_a.ndim != 2 or lora_b.ndim != 2 or lora_a.shape[0] != lora_b.shape[1]:
            expected = "[vocab, r] and [dim, r]" if embedding else "[r, in] and [out, r]"
            raise AdapterFormatError(f"{path}: {shapes} are not a LoRA pair (expected {expected})")
        for suffix, tensor in zip(SUFFIXES, (lora_a, lora_b)):
            if not torch.isfinite(tensor).all():
                raise AdapterFormatError(f"{path}: tensor '{base}{suffix}' contains NaN or Inf values")
        weights[module] = (lora_a, lora_b)
    return weights


def _tensor_data(path: Path, name: str, tensor: object) -> torch.Tensor:
    """A tensor's values as float32 [rows, columns] (GGUF lists dimensions innermost first)."""
    shape = tuple(int(n) for n in reversed(tensor.shape))
    try:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as exc:
        raise AdapterFormatError(f"{path}: tensor {name!r} has type {tensor.tensor_type.name}, which deltaw cannot "
                                 "read; export it as F32, F16, BF16 or Q8_0") from exc
    return torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))  # a copy: the file may close
