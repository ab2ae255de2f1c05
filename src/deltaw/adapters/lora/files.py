"""LoRA adapters on disk, in PEFT's layout, read and written with every check done before the model is touched.

    DIR/adapter_config.json         {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": [...],
                                     ..., "deltaw": {"fingerprint": {...}, ...}}
    DIR/adapter_model.safetensors   base_model.model.<module path>.lora_A.weight  [r, in]
                                    base_model.model.<module path>.lora_B.weight  [out, r]

PEFT, vLLM and LoRAX read these files; deltaw reads theirs. deltaw's own facts live under the one extra
config key "deltaw", which PEFT ignores. Pickle files (.bin, .pt) are refused: unpickling runs code.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from deltaw.adapters.files import (
    CONFIG_FILE,
    KEY_PREFIX,
    WEIGHTS_FILE,
    AdapterFormatError,
    check_fingerprint,
    deltaw_section,
    read_adapter_dir,
    size_on_disk,
    write_adapter_files,
)
from deltaw.adapters.fingerprint import model_fingerprint
from deltaw.adapters.lora.config import LoRAConfig, lora_scaling
from deltaw.adapters.lora.inject import lora_layers, wrap_linear
from deltaw.adapters.state import AdapterRecord, adapters_of, require_adapter
from deltaw.adapters.targets import ALL_LINEAR, linear_modules, output_head

_LORA_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight")
_UNSUPPORTED = {  # config key -> value deltaw supports
    "use_dora": False, "fan_in_fan_out": False, "bias": "none", "layers_to_transform": None,
    "modules_to_save": None, "target_parameters": None,
}


@dataclass
class AdapterFile:
    """A parsed adapter directory.

    Attributes:
        path: the directory.
        config: adapter_config.json as a dict.
        weights: module path -> (A [r, in], B [out, r]), as stored.
    """

    path: Path
    config: dict
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def num_parameters(self) -> int:
        return sum(a.numel() + b.numel() for a, b in self.weights.values())


# --------------------------------------------------------------------------------------------- reading
def read_lora_adapter(path: str | os.PathLike) -> AdapterFile:
    """Read and check a LoRA adapter directory on its own (no model needed)."""
    path = Path(path)
    config, tensors = read_adapter_dir(path)
    _check_lora_config(config, path / CONFIG_FILE)
    return AdapterFile(path=path, config=config, weights=_pair_tensors(tensors, path / WEIGHTS_FILE))


def _check_lora_config(config: dict, config_file: Path) -> None:
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise AdapterFormatError(f"{config_file}: key 'peft_type': expected 'LORA', found {peft_type!r}: this "
                                 "operation works on LoRA adapters only")
    for key, supported in _UNSUPPORTED.items():
        value = config.get(key, supported)
        if value != supported and value not in ([], {}):
            raise AdapterFormatError(
                f"{config_file}: key {key!r} = {value!r} is not supported by deltaw (expected {supported!r}); "
                "merge that part into the base model with PEFT or retrain without it"
            )
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise AdapterFormatError(f"{config_file}: key {key!r}: expected a positive number, found {value!r}")
    if not isinstance(config.get("target_modules"), (str, list)):
        raise AdapterFormatError(
            f"{config_file}: key 'target_modules': expected a list of names or a regex string, "
            f"found {config.get('target_modules')!r}"
        )


def _pair_tensors(
    tensors: dict[str, torch.Tensor], weights_file: Path
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Group `base_model.model.<module>.lora_{A,B}.weight` keys by module; any other key is an error."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if not key.startswith(KEY_PREFIX):
            raise AdapterFormatError(
                f"{weights_file}: key {key!r} has the wrong prefix: expected keys like "
                f"'{KEY_PREFIX}<module path>.lora_A.weight' (PEFT's layout)"
            )
        match = _LORA_KEY.fullmatch(key)
        if match is None:
            raise AdapterFormatError(
                f"{weights_file}: unexpected key {key!r}: expected '{KEY_PREFIX}<module path>.lora_A.weight' or "
                "'.lora_B.weight' (DoRA magnitudes, biases, embeddings and modules_to_save are not supported)"
            )
        parts.setdefault(match["module"], {})[match["part"]] = tensor
    if not parts:
        raise AdapterFormatError(f"{weights_file}: holds no LoRA tensors")
    weights = {}
    for module, pair in parts.items():
        for part in "AB":
            if part not in pair:
                raise AdapterFormatError(f"{weights_file}: missing key '{KEY_PREFIX}{module}.lora_{part}.weight'")
        weights[module] = (pair["A"], pair["B"])
    return weights


# --------------------------------------------------------------------------------------------- checking
@dataclass
class PlannedLayer:
    """One layer's part of a validated adapter, ready to attach."""

    module: str
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scaling: float


@dataclass
class LoRAPlan:
    """A LoRA adapter checked against a model: its file and the layers to attach."""

    adapter: AdapterFile
    layers: list[PlannedLayer]


def plan_load(
    model: nn.Module, adapter: AdapterFile, ignore_fingerprint: bool = False, dtype: torch.dtype | None = None
) -> LoRAPlan:
    """Check `adapter` against `model` and return the layers to attach; raise AdapterFormatError otherwise."""
    where = adapter.path / WEIGHTS_FILE
    config = adapter.config
    linears = linear_modules(model)
    planned = []
    for module, (lora_a, lora_b) in adapter.weights.items():
        key = f"{KEY_PREFIX}{module}"
        if module not in linears:
            raise AdapterFormatError(f"{where}: key '{key}.lora_A.weight' targets {module!r}, which is not a "
                                     f"linear layer of this model; is this adapter for another base model?")
        layer = linears[module]
        rank = lora_a.shape[0] if lora_a.ndim == 2 else -1
        expected_a, expected_b = (rank, layer.in_features), (layer.out_features, rank)
        if lora_a.ndim != 2 or tuple(lora_a.shape) != expected_a or tuple(lora_b.shape) != expected_b:
            raise AdapterFormatError(
                f"{where}: shape mismatch for {module!r}: expected lora_A [r, {layer.in_features}] and lora_B "
                f"[{layer.out_features}, r], found {list(lora_a.shape)} and {list(lora_b.shape)}"
            )
        config_rank = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
        if rank != config_rank:
            raise AdapterFormatError(
                f"{where}: key '{key}.lora_A.weight' has rank {rank} but {CONFIG_FILE} says r={config_rank}"
            )
        for part, tensor in (("A", lora_a), ("B", lora_b)):
            if not torch.isfinite(tensor).all():
                raise AdapterFormatError(f"{where}: key '{key}.lora_{part}.weight' contains NaN or Inf values")
        target_dtype = dtype or layer.weight.dtype
        device = layer.weight.device
        planned.append(PlannedLayer(
            module, lora_a.to(device, target_dtype), lora_b.to(device, target_dtype), module_scaling(config, module, rank),
        ))
    _check_target_set(model, adapter, linears)
    if not ignore_fingerprint:
        check_fingerprint(model, adapter.config, adapter.path / CONFIG_FILE)
    return LoRAPlan(adapter, planned)


def module_scaling(config: dict, module: str, rank: int) -> float:
    """The scaling PEFT gives `module` under this config: alpha (or its alpha_pattern) over r or √r."""
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
    return lora_scaling(alpha, rank, bool(config.get("use_rslora", False)))


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    """PEFT's rank_pattern/alpha_pattern lookup: the first key matching the end of the module path."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def peft_target_matches(config: dict, module: str, head: str | None) -> bool:
    """Whether PEFT would adapt `module` under this config's target_modules and exclude_modules."""
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str) and re.fullmatch(exclude, module):
            return False
        if isinstance(exclude, list) and (module in exclude or any(module.endswith("." + e) for e in exclude)):
            return False
    targets = config["target_modules"]
    if targets == ALL_LINEAR:
        return module != head
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return module in targets or any(module.endswith("." + target) for target in targets)


def _check_target_set(model: nn.Module, adapter: AdapterFile, linears: dict[str, nn.Module]) -> None:
    head = output_head(model)
    expected = {name for name in linears if peft_target_matches(adapter.config, name, head)}
    found = set(adapter.weights)
    where = adapter.path / WEIGHTS_FILE
    missing, extra = sorted(expected - found), sorted(found - expected)
    if missing:
        raise AdapterFormatError(
            f"{where}: missing key '{KEY_PREFIX}{missing[0]}.lora_A.weight' ({len(missing)} targeted modules "
            f"have no tensors): {CONFIG_FILE} target_modules={adapter.config['target_modules']!r} selects them"
        )
    if extra:
        raise AdapterFormatError(
            f"{where}: extra key '{KEY_PREFIX}{extra[0]}.lora_A.weight' ({len(extra)} modules): not selected by "
            f"{CONFIG_FILE} target_modules={adapter.config['target_modules']!r}"
        )


# --------------------------------------------------------------------------------------------- attaching
def attach_lora(model: nn.Module, name: str, planned: LoRAPlan, metadata: dict) -> AdapterRecord:
    """Add the checked layers of `planned` to `model` as adapter `name` (not activated)."""
    dropout = float(planned.adapter.config.get("lora_dropout") or 0.0)
    for layer in planned.layers:
        wrap_linear(model, layer.module).add_adapter(name, layer.lora_a, layer.lora_b, layer.scaling, dropout)
    record = AdapterRecord(kind="lora", config=config_from_peft(planned.adapter.config), metadata=metadata)
    adapters_of(model).adapters[name] = record
    return record


def config_from_peft(config: dict) -> LoRAConfig:
    """The LoRAConfig that PEFT's adapter_config.json describes (targets in deltaw's full-match syntax)."""
    targets = config["target_modules"]
    if isinstance(targets, list):
        targets = [r"(.*\.)?" + re.escape(target) for target in targets]
    deltaw = deltaw_section(config)
    return LoRAConfig(
        rank=int(config["r"]),
        alpha=float(config["lora_alpha"]),
        dropout=float(config.get("lora_dropout") or 0.0),
        targets=targets,
        use_rslora=bool(config.get("use_rslora", False)),
        init=deltaw.get("init", "gaussian" if config.get("init_lora_weights") == "gaussian" else "kaiming"),
    )


# --------------------------------------------------------------------------------------------- saving
def save_lora(model: nn.Module, name: str, path: str | os.PathLike, metadata: dict) -> Path:
    """Write LoRA adapter `name` to directory `path` in PEFT's layout; each file is replaced atomically.

    `metadata` is merged into the config's "deltaw" section (e.g. how the adapter was trained).
    """
    record = require_adapter(model, name)
    layers = {module: layer for module, layer in lora_layers(model) if name in layer.lora_A}
    cfg = record.config
    deltaw = {key: value for key, value in record.metadata.items() if key != "fingerprint"}
    deltaw.update(fingerprint=model_fingerprint(model), targets=cfg.to_dict()["targets"],
                  exclude=list(cfg.exclude), init=cfg.init, **metadata)
    config = lora_config_dict(
        ranks={module: layer.rank(name) for module, layer in layers.items()},
        scalings={module: layer.scaling[name] for module, layer in layers.items()},
        target_modules=target_modules_for(list(linear_modules(model)), sorted(layers)),
        use_rslora=cfg.use_rslora, dropout=cfg.dropout, init=cfg.init,
        base_model=getattr(getattr(model, "config", None), "_name_or_path", None),
        deltaw=deltaw, rank=cfg.rank, alpha=cfg.alpha,
    )
    weights = {module: (layer.lora_A[name], layer.lora_B[name]) for module, layer in layers.items()}
    write_adapter(path, weights, config)
    return Path(path)


def write_adapter(path: str | os.PathLike, weights: dict[str, tuple[torch.Tensor, torch.Tensor]], config: dict) -> Path:
    """Write module -> (A [r, in], B [out, r]) and `config` as a PEFT-layout directory, each file atomically."""
    tensors = {}
    for module, (lora_a, lora_b) in weights.items():
        tensors[f"{KEY_PREFIX}{module}.lora_A.weight"] = lora_a
        tensors[f"{KEY_PREFIX}{module}.lora_B.weight"] = lora_b
    return write_adapter_files(path, tensors, config)


def lora_config_dict(
    ranks: dict[str, int],
    scalings: dict[str, float],
    target_modules: list[str] | str,
    *,
    use_rslora: bool = False,
    dropout: float = 0.0,
    init: str = "kaiming",
    base_model: str | None = None,
    deltaw: dict | None = None,
    rank: int | None = None,
    alpha: float | None = None,
) -> dict:
    """adapter_config.json for layers with these ranks and scalings: PEFT's keys, `rank` (default: the
    most common rank) as `r`, per-layer exceptions in rank_pattern/alpha_pattern."""
    alphas = {module: _alpha_of(scalings[module], ranks[module], use_rslora) for module in ranks}
    if rank is None or rank not in ranks.values():
        rank, alpha = Counter(ranks.values()).most_common(1)[0][0], None
    if alpha is None:
        alpha = Counter(a for m, a in alphas.items() if ranks[m] == rank).most_common(1)[0][0]
    rank_pattern = {re.escape(m): r for m, r in ranks.items() if r != rank}
    alpha_pattern = {re.escape(m): a for m, a in alphas.items()
                     if lora_scaling(alpha, ranks[m], use_rslora) != scalings[m]}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": target_modules,
        "exclude_modules": None,
        "use_rslora": use_rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": "gaussian" if init == "gaussian" else True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_dora": False,
        "inference_mode": True,
        "deltaw": deltaw or {},
    }


def _alpha_of(scaling: float, rank: int, use_rslora: bool) -> float:
    alpha = scaling * (rank**0.5 if use_rslora else rank)
    return round(alpha, 6)


def target_modules_for(linear_names: list[str], modules: list[str]) -> list[str] | str:
    """PEFT's target_modules for exactly `modules` among a model's linear layers: the leaf names when
    they select exactly this set (what PEFT itself writes, and what vLLM expects), else a full-match
    regex of the paths."""
    leaves = sorted({module.rsplit(".", 1)[-1] for module in modules})
    by_leaves = [name for name in linear_names if peft_target_matches({"target_modules": leaves}, name, head=None)]
    if sorted(by_leaves) == sorted(modules):
        return leaves
    return "|".join(re.escape(module) for module in sorted(modules))


# --------------------------------------------------------------------------------------------- inspecting
def describe_lora(adapter: AdapterFile) -> str:
    """A human-readable summary of a LoRA adapter: config, targets, ranks, size, fingerprint."""
    config = adapter.config
    ranks = Counter(a.shape[0] for a, _ in adapter.weights.values())
    dtypes = sorted({str(a.dtype).replace("torch.", "") for a, _ in adapter.weights.values()})
    size = size_on_disk(adapter.path)
    leaves = Counter(module.rsplit(".", 1)[-1] for module in adapter.weights)
    deltaw = deltaw_section(config)
    lines = [
        f"adapter       {adapter.path}",
        f"type          {config['peft_type']} (use_rslora={config.get('use_rslora', False)})",
        f"base model    {config.get('base_model_name_or_path')}",
        f"rank          r={config['r']}, alpha={config['lora_alpha']}, per-layer ranks {dict(sorted(ranks.items()))}",
        f"targets       {config['target_modules']}",
        f"modules       {len(adapter.weights)} ({', '.join(f'{k}: {v}' for k, v in sorted(leaves.items()))})",
        f"parameters    {adapter.num_parameters:,} ({', '.join(dtypes)})",
        f"size on disk  {size:,} bytes ({size / 2**20:.2f} MiB)",
        f"fingerprint   {deltaw.get('fingerprint', 'none (not written by deltaw)')}",
    ]
    extra = {k: v for k, v in deltaw.items() if k not in ("fingerprint", "targets", "exclude", "init")}
    if extra:
        lines.append(f"metadata      {json.dumps(extra, sort_keys=True)}")
    return "\n".join(lines)
