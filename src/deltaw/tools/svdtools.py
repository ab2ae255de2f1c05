"""Adapters by SVD: extract one from a fine-tuned model, resize one, combine several exactly.

    extract:  ΔW = W_tuned − W_base per linear layer        -> truncated SVD -> adapter
    resize:   ΔW = scaling·B·A per layer                     -> truncated SVD -> adapter of lower rank
    combine:  ΔW = Σ_i w_i·scaling_i·B_i·A_i per layer        -> "cat": exact, ranks add
                                                             -> "svd": truncated SVD of the exact sum

Every output layer has scaling 1 (alpha = rank); per-layer ranks go to rank_pattern/alpha_pattern,
or, with `uniform=True`, every layer is zero-padded to the largest rank (the same product, for
servers that ignore per-layer ranks). Reports give per layer the rank, the energy kept and the
relative Frobenius error.

LoRA on an embedding is a product B·A like any other (ΔEᵀ = s·B·A) and is resized and combined the same
way. A DoRA adapter's change is not a product (m ⊙ (W + s·B·A)/‖W + s·B·A‖ − W needs W), nor are trainable
token rows (they replace rows of E): resize keeps token rows as they are, and every other case is refused
with the way round it (merge, then extract).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from deltaw.adapters import AdapterFormatError, disable_adapters, load_adapter, set_adapter
from deltaw.adapters.fingerprint import model_fingerprint
from deltaw.adapters.lora.files import (
    AdapterFile,
    lora_config_dict,
    module_scaling,
    read_lora_adapter,
    target_modules_for,
    write_adapter,
)
from deltaw.adapters.targets import linear_modules, tied_weight_modules
from deltaw.models.loading import BUNDLED_NAME, load_model, resolve_model_dir
from deltaw.quant.nf4 import NF4Weight
from deltaw.tools.svd import Factored, factor_dense, factor_product, pad_rank


@dataclass
class LayerReport:
    module: str
    rank: int
    energy: float
    rel_error: float
    norm: float  # ‖ΔW‖_F of the layer


@dataclass
class SVDReport:
    """What an extract/resize/combine produced, layer by layer."""

    operation: str
    out: Path
    layers: list[LayerReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def rel_error(self) -> float:
        """‖ΔW − B·A‖_F / ‖ΔW‖_F over all layers together."""
        total = sum(layer.norm**2 for layer in self.layers)
        lost = sum((layer.rel_error * layer.norm) ** 2 for layer in self.layers)
        return (lost / total) ** 0.5 if total else 0.0

    def __str__(self) -> str:
        lines = [f"{'module':<44} {'rank':>5} {'energy kept':>12} {'rel. error':>11}"]
        for layer in self.layers:
            lines.append(f"{layer.module:<44} {layer.rank:>5} {layer.energy:>12.6f} {layer.rel_error:>11.2e}")
        ranks = sorted({layer.rank for layer in self.layers})
        lines.append(f"{self.operation}: {len(self.layers)} layers, ranks {ranks[0]}..{ranks[-1]}, overall relative "
                     f"error {self.rel_error:.3e} -> {self.out}")
        return "\n".join(lines + self.notes)


def _write(out: str | os.PathLike, factored: dict[str, Factored], target_modules, uniform: bool, deltaw: dict,
           base_model: str | None, embeddings: set[str] = frozenset(), source: AdapterFile | None = None) -> None:
    """Write the factored layers (`embeddings` among them) as an adapter, with the token rows of `source`."""
    ranks = {module: f.rank for module, f in factored.items()}
    if uniform:
        top = max(ranks.values())
        weights = {module: pad_rank(f, top) for module, f in factored.items()}
        ranks = dict.fromkeys(ranks, top)
    else:
        weights = {module: (f.lora_a, f.lora_b) for module, f in factored.items()}
    tokens = source.tokens if source else {}
    config = lora_config_dict(ranks, dict.fromkeys(ranks, 1.0), target_modules, base_model=base_model, deltaw=deltaw,
                              trainable_token_indices=source.config.get("trainable_token_indices") if tokens else None)
    write_adapter(out, weights, config, embeddings=embeddings, tokens=tokens)


def _refuse_changes_not_products(adapter: AdapterFile, operation: str, tokens_allowed: bool = False) -> None:
    """DoRA adapters (and, unless `tokens_allowed`, token rows) are not B·A products: refuse with the way round."""
    if adapter.is_dora:
        raise AdapterFormatError(
            f"{adapter.path}: a DoRA adapter (use_dora): its weight change m ⊙ (W + s·B·A)/‖W + s·B·A‖ − W is not the "
            f"product B·A, so {operation} cannot work on its factors. Merge it (deltaw merge) and extract an adapter "
            "from the merged model (deltaw extract)")
    if adapter.tokens and not tokens_allowed:
        raise AdapterFormatError(
            f"{adapter.path}: holds trainable token rows (trainable_token_indices), which replace rows of the "
            f"embedding instead of adding a product B·A; {operation} cannot combine them. Merge the adapters into "
            "one model (deltaw merge) and extract from it, or combine adapters without token rows")


def _report_row(module: str, factored: Factored, norm: float) -> LayerReport:
    return LayerReport(module, factored.rank, factored.energy, factored.rel_error, norm)


# --------------------------------------------------------------------------------------------- extract
def extract_adapter(
    base: str, tuned: str, out: str | os.PathLike, rank: int | None = None, energy: float | None = None,
    uniform: bool = False, progress: bool = True,
) -> SVDReport:
    """An adapter for `base` whose B·A approximates `tuned` − `base` in every linear layer that differs.

    The base model is loaded; the tuned checkpoint's tensors are read one at a time from its safetensors
    files, so memory holds one model and one layer's ΔW, never two models' deltas.
    """
    model, _ = load_model(base, dtype=torch.float32)
    tuned_tensors = TensorFiles(resolve_model_dir(tuned))
    linears = linear_modules(model)
    tied = tied_weight_modules(model)
    report = SVDReport("extract", Path(out))
    factored: dict[str, Factored] = {}
    for module, layer in tqdm(linears.items(), desc="extract", disable=not progress):
        key = f"{module}.weight"
        if key not in tuned_tensors:
            if module not in tied:
                report.notes.append(f"note: {tuned} has no tensor {key!r}; layer skipped")
            continue
        tuned_weight = tuned_tensors.get(key)
        if tuned_weight.shape != layer.weight.shape:  # checked before subtracting: shapes could broadcast
            raise ValueError(f"{key}: the tuned model's shape {list(tuned_weight.shape)} differs from the base's "
                             f"{list(layer.weight.shape)}: not a fine-tune of this base")
        weight = layer.weight.dequantize() if isinstance(layer.weight, NF4Weight) else layer.weight.detach()
        delta = tuned_weight.double() - weight.double()  # an NF4 base: the change from its dequantized weight
        norm = float(delta.norm())
        if norm == 0:
            continue
        factored[module] = factor_dense(delta, rank=rank, energy=energy)
        report.layers.append(_report_row(module, factored[module], norm))
    if not factored:
        raise ValueError(f"no linear layer of {tuned} differs from {base}: nothing to extract")
    other = [name for name, p in model.named_parameters()
             if name.rsplit(".", 1)[0] not in linears and name in tuned_tensors
             and not torch.equal(tuned_tensors.get(name).to(p.dtype), p.detach())]
    if other:
        report.notes.append(f"note: {len(other)} other tensors differ and are not in the adapter "
                            f"(extract factors linear layers only): {other[:4]}")
    deltaw = {"fingerprint": model_fingerprint(model), "svd": {"operation": "extract", "tuned": str(tuned),
              "rank": rank, "energy": energy, "rel_error": report.rel_error}}
    _write(out, factored, target_modules_for(list(linears), sorted(factored)), uniform, deltaw, base)
    return report


class TensorFiles:
    """Tensors of an HF model directory's safetensors files, read one at a time on demand."""

    def __init__(self, directory: str | os.PathLike) -> None:
        files = sorted(Path(directory).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{directory}: no .safetensors files (a local HF model directory is needed)")
        self.location: dict[str, Path] = {}
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                self.location.update(dict.fromkeys(handle.keys(), file))

    def __contains__(self, key: str) -> bool:
        return key in self.location

    def get(self, key: str) -> torch.Tensor:
        with safe_open(str(self.location[key]), framework="pt") as handle:
            return handle.get_tensor(key)


# --------------------------------------------------------------------------------------------- resize
def resize_adapter(
    path: str | os.PathLike, out: str | os.PathLike, rank: int | None = None, energy: float | None = None,
    uniform: bool = False,
) -> SVDReport:
    """The adapter in `path` truncated to `rank` (or to keep `energy` of each layer's ‖ΔW‖²)."""
    adapter = read_lora_adapter(path)
    _refuse_changes_not_products(adapter, "resize", tokens_allowed=True)
    report = SVDReport("resize", Path(out))
    factored = {}
    for module, (lora_a, lora_b) in adapter.weights.items():
        scaled_b = lora_b.double() * module_scaling(adapter.config, module, lora_a.shape[0])
        factored[module] = factor_product(scaled_b, lora_a, rank=rank, energy=energy)
        report.layers.append(_report_row(module, factored[module], _product_norm(scaled_b, lora_a)))
    deltaw = {**_inherited(adapter.config), "svd": {"operation": "resize", "source": str(path), "rank": rank,
              "energy": energy, "rel_error": report.rel_error}}
    _write(out, factored, adapter.config["target_modules"], uniform, deltaw, adapter.config.get("base_model_name_or_path"),
           adapter.embeddings, source=adapter)
    return report


def _product_norm(lora_b: torch.Tensor, lora_a: torch.Tensor) -> float:
    """‖B·A‖_F without forming B·A: √trace((BᵀB)(AAᵀ))."""
    return float(((lora_b.T @ lora_b) * (lora_a.double() @ lora_a.double().T)).sum().clamp_min(0).sqrt())


def _inherited(config: dict) -> dict:
    deltaw = config.get("deltaw") or {}
    return {"fingerprint": deltaw["fingerprint"]} if "fingerprint" in deltaw else {}


# --------------------------------------------------------------------------------------------- combine
def combine_adapters(
    paths: list[str | os.PathLike], weights: list[float], out: str | os.PathLike, method: str = "svd",
    rank: int | None = None, energy: float | None = None, uniform: bool = False,
) -> SVDReport:
    """Σ_i weights[i]·ΔW_i per layer: "cat" stacks the factors (exact, ranks add); "svd" truncates the
    exact sum to `rank`/`energy`. Adapters may target different layers and have different ranks."""
    if len(paths) < 2 or len(weights) != len(paths):
        raise ValueError(f"give at least two adapters and one weight each; found {len(paths)} adapters, "
                         f"{len(weights)} weights")
    if method not in ("svd", "cat"):
        raise ValueError(f"--method must be 'svd' or 'cat', found {method!r}")
    if method == "svd" and (rank is None) == (energy is None):
        raise ValueError("--method svd needs exactly one of --rank and --energy")
    adapters = [read_lora_adapter(path) for path in paths]
    for adapter in adapters:
        _refuse_changes_not_products(adapter, "combine")
    fingerprint = _common_fingerprint(adapters)
    stacks: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for adapter, weight in zip(adapters, weights):
        for module, (lora_a, lora_b) in adapter.weights.items():
            b_parts, a_parts = stacks.setdefault(module, ([], []))
            if a_parts and (a_parts[0].shape[1], b_parts[0].shape[0]) != (lora_a.shape[1], lora_b.shape[0]):
                raise AdapterFormatError(f"{adapter.path}: {module!r} is [{lora_b.shape[0]}, {lora_a.shape[1]}] here "
                                         f"but [{b_parts[0].shape[0]}, {a_parts[0].shape[1]}] in another adapter: "
                                         "these adapters are for different base models")
            b_parts.append(lora_b.double() * (weight * module_scaling(adapter.config, module, lora_a.shape[0])))
            a_parts.append(lora_a.double())
    report = SVDReport(f"combine ({method})", Path(out))
    factored = {}
    for module, (b_parts, a_parts) in stacks.items():
        lora_b, lora_a = torch.cat(b_parts, dim=1), torch.cat(a_parts, dim=0)
        norm = _product_norm(lora_b, lora_a)
        if method == "cat":
            factored[module] = Factored(lora_a.float(), lora_b.float(), energy=1.0, rel_error=0.0)
        else:
            factored[module] = factor_product(lora_b, lora_a, rank=rank, energy=energy)
        report.layers.append(_report_row(module, factored[module], norm))
    targets = [a.config["target_modules"] for a in adapters]
    target_modules = (sorted({t for ts in targets for t in ts}) if all(isinstance(t, list) for t in targets)
                      else "|".join(sorted(re.escape(m) for m in factored)))
    deltaw = {**({"fingerprint": fingerprint} if fingerprint else {}),
              "svd": {"operation": "combine", "method": method, "sources": [str(p) for p in paths],
                      "weights": list(weights), "rank": rank, "energy": energy, "rel_error": report.rel_error}}
    _write(out, factored, target_modules, uniform, deltaw, adapters[0].config.get("base_model_name_or_path"),
           {module for adapter in adapters for module in adapter.embeddings})
    return report


def _common_fingerprint(adapters) -> dict | None:
    prints = [(a.path, (a.config.get("deltaw") or {}).get("fingerprint")) for a in adapters]
    known = [(path, fp) for path, fp in prints if fp]
    for path, fp in known[1:]:
        if fp != known[0][1]:
            differs = [k for k in fp if fp.get(k) != known[0][1].get(k)]
            raise AdapterFormatError(f"{path} and {known[0][0]} were made for different base models "
                                     f"({', '.join(differs)} differ): they cannot be combined")
    return known[0][1] if known else None


# --------------------------------------------------------------------------------------------- logits
@torch.no_grad()
def logit_difference(model_name: str, first: str | os.PathLike, second: str | os.PathLike,
                     text: str = "The quick brown fox jumps over the lazy dog.") -> tuple[float, float]:
    """(max |Δlogit|, max |logit change of the first adapter over the base|) on `text`."""
    model, tokenizer = load_model(model_name)
    load_adapter(model, first, "first", ignore_fingerprint=True)
    load_adapter(model, second, "second", ignore_fingerprint=True)
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    set_adapter(model, "first")
    reference = model(ids).logits
    set_adapter(model, "second")
    other = model(ids).logits
    with disable_adapters(model):
        base = model(ids).logits
    return float((reference - other).abs().max()), float((reference - base).abs().max())



# --------------------------------------------------------------------------------------------- the commands
@dataclass(kw_only=True)
class SVDOptions:
    """The output of an SVD command.

    Attributes:
        out: the output adapter directory.
        rank: the rank per layer (at most).
        energy: keep this fraction of each layer's squared Frobenius norm instead of a fixed rank.
        uniform: zero-pad every layer to the largest rank (for servers that ignore rank_pattern).
    """

    out: str
    rank: int | None = None
    energy: float | None = None
    uniform: bool = False

    def rank_or_energy(self) -> dict:
        """{"rank": ..., "energy": ...} with exactly one of the two set, or a ValueError."""
        if (self.rank is None) == (self.energy is None):
            raise ValueError("give exactly one of --rank and --energy")
        return {"rank": self.rank, "energy": self.energy}


@dataclass(kw_only=True)
class ExtractOptions(SVDOptions):
    """`deltaw extract`: an adapter from a fine-tuned model (SVD of W_tuned - W_base per layer).

    Attributes:
        tuned: the fine-tuned model directory (safetensors).
        base: the base model it was tuned from.
        progress: the progress bar.
    """

    tuned: str
    base: str = BUNDLED_NAME
    progress: bool = field(default=True, metadata={"negate": "--no-progress"})


@dataclass(kw_only=True)
class ResizeOptions(SVDOptions):
    """`deltaw resize`: an adapter's rank lowered by SVD of each layer's B·A.

    Attributes:
        adapter: the adapter directory.
        model: a base model: also report the logit difference on a sample sentence.
    """

    adapter: str = field(metadata={"positional": True})
    model: str | None = None


@dataclass(kw_only=True)
class CombineOptions(SVDOptions):
    """`deltaw combine`: adapters combined into one, exactly (cat) or truncated (svd).

    Attributes:
        adapters: the adapter directories.
        weights: one weight per adapter (default 1 each).
        method: svd (the exact sum truncated to --rank/--energy) or cat (exact: the ranks add).
    """

    adapters: list[str] = field(metadata={"positional": True})
    weights: list[float] | None = None
    method: str = field(default="svd", metadata={"choices": ("svd", "cat")})


def run_extract(options: ExtractOptions) -> SVDReport:
    return extract_adapter(options.base, options.tuned, options.out, uniform=options.uniform,
                           progress=options.progress, **options.rank_or_energy())


def run_resize(options: ResizeOptions) -> SVDReport:
    report = resize_adapter(options.adapter, options.out, uniform=options.uniform, **options.rank_or_energy())
    if options.model:
        difference, effect = logit_difference(options.model, options.adapter, options.out)
        report.notes.append(f"logits on a sample sentence: max |resized - original| = {difference:.4g} "
                            f"(the original adapter moves them by up to {effect:.4g})")
    return report


def run_combine(options: CombineOptions) -> SVDReport:
    weights = options.weights or [1.0] * len(options.adapters)
    return combine_adapters(options.adapters, weights, options.out, method=options.method, rank=options.rank,
                            energy=options.energy, uniform=options.uniform)
