"""LoRA adapters on disk, in PEFT's layout, read and written with every check done before the model is touched.

    DIR/adapter_config.json         {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": [...],
                                     ..., "deltaw": {"fingerprint": {...}, ...}}
    DIR/adapter_model.safetensors   base_model.model.<module path>.lora_A.weight  [r, in]
                                    base_model.model.<module path>.lora_B.weight  [out, r]
                                    (DoRA magnitudes, embedding pairs, token rows: see layout.py and parts.py)

PEFT, vLLM and LoRAX read these files; deltaw reads theirs. deltaw's own facts live under the one extra
config key "deltaw", which PEFT ignores. Pickle files (.bin, .pt) are refused: unpickling runs code.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
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
from deltaw.adapters.lora.inject import wrap_embedding, wrap_linear
from deltaw.adapters.lora.layout import AdapterFile, adapter_tensors, pair_key, parse_tensors
from deltaw.adapters.lora.parts import (
    PlannedTokens,
    attach_tokens,
    check_base_copies,
    check_parts,
    describe_parts,
    plan_tokens,
    planned_magnitude,
    saved_parts,
    token_ids_of,
)
from deltaw.adapters.state import AdapterRecord, adapters_of, require_adapter
from deltaw.adapters.targets import ALL_LINEAR, adaptable_modules, is_embedding, is_linear, output_head

_UNSUPPORTED = {  # config key -> value deltaw supports
    "fan_in_fan_out": False, "bias": "none", "layers_to_transform": None, "target_parameters": None,
}


# --------------------------------------------------------------------------------------------- reading
def read_lora_adapter(path: str | os.PathLike) -> AdapterFile:
    """Read and check a LoRA adapter directory on its own (no model needed)."""
    path = Path(path)
    config, tensors = read_adapter_dir(path)
    _check_lora_config(config, path / CONFIG_FILE)
    adapter = parse_tensors(path, config, tensors, path / WEIGHTS_FILE)
    check_parts(adapter)
    return adapter


def _check_lora_config(config: dict, config_file: Path) -> None:
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise AdapterFormatError(f"{config_file}: key 'peft_type': expected 'LORA', found {peft_type!r}: this "
                                 "operation works on LoRA adapters only")
    if config.get("modules_to_save"):
        raise AdapterFormatError(
            f"{config_file}: key 'modules_to_save' = {config['modules_to_save']!r}: whole-module copies are not "
            "supported by deltaw (an adapter holds low-rank changes it can merge, unmerge and serve per request). "
            "Train those modules with LoRA instead (an untied lm_head or the embedding can be LoRA targets) or with "
            "trainable tokens; or merge this adapter with PEFT (merge_and_unload) and load the merged model"
        )
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


# --------------------------------------------------------------------------------------------- checking
@dataclass
class PlannedLayer:
    """One layer's part of a validated adapter, ready to attach.

    Attributes:
        module: the module's dotted name.
        lora_a: [r, in] (an embedding's: [r, vocab]).   lora_b: [out, r] (an embedding's: [dim, r]).
        scaling: the layer's scaling.
        magnitude: DoRA's m [out], or None.
        embedding: whether the module is an embedding (lora_embedding_A/B).
    """

    module: str
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scaling: float
    magnitude: torch.Tensor | None = None
    embedding: bool = False


@dataclass
class LoRAPlan:
    """A LoRA adapter checked against a model: its file, the layers to attach and its trainable token rows."""

    adapter: AdapterFile
    layers: list[PlannedLayer]
    tokens: list[PlannedTokens] = field(default_factory=list)


def plan_load(
    model: nn.Module, adapter: AdapterFile, ignore_fingerprint: bool = False, dtype: torch.dtype | None = None
) -> LoRAPlan:
    """Check `adapter` against `model` and return the layers to attach; raise AdapterFormatError otherwise."""
    modules = adaptable_modules(model, embeddings=True)
    planned = [_plan_layer(adapter, module, modules.get(module), dtype) for module in adapter.weights]
    _check_target_set(model, adapter, modules)
    tokens = plan_tokens(model, adapter, dtype)
    check_base_copies(model, adapter)
    if not ignore_fingerprint:
        check_fingerprint(model, adapter.config, adapter.path / CONFIG_FILE)
    return LoRAPlan(adapter, planned, tokens)


def _plan_layer(adapter: AdapterFile, module: str, layer: nn.Module | None, dtype: torch.dtype | None) -> PlannedLayer:
    """One module's pair (and DoRA magnitude), checked against the model's layer of that name."""
    where, config = adapter.path / WEIGHTS_FILE, adapter.config
    lora_a, lora_b = adapter.weights[module]
    embedding = module in adapter.embeddings
    key = f"{KEY_PREFIX}{module}.{pair_key(embedding, 'A')}"
    kind = "an embedding" if embedding else "a linear layer"
    if layer is None or not (is_embedding(layer) if embedding else is_linear(layer)):
        raise AdapterFormatError(f"{where}: key '{key}' targets {module!r}, which is not {kind} of this model; "
                                 "is this adapter for another base model?")
    fan_in, fan_out = (layer.num_embeddings, layer.embedding_dim) if embedding else (layer.in_features,
                                                                                       layer.out_features)
    rank = lora_a.shape[0] if lora_a.ndim == 2 else -1
    if lora_a.ndim != 2 or tuple(lora_a.shape) != (rank, fan_in) or tuple(lora_b.shape) != (fan_out, rank):
        a_name, b_name = (pair_key(embedding, part).removesuffix(".weight") for part in "AB")
        raise AdapterFormatError(f"{where}: shape mismatch for {module!r}: expected {a_name} [r, {fan_in}] and "
                                 f"{b_name} [{fan_out}, r], found {list(lora_a.shape)} and {list(lora_b.shape)}")
    config_rank = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
    if rank != config_rank:
        raise AdapterFormatError(f"{where}: key '{key}' has rank {rank} but {CONFIG_FILE} says r={config_rank}")
    for part, tensor in (("A", lora_a), ("B", lora_b)):
        if not torch.isfinite(tensor).all():
            raise AdapterFormatError(f"{where}: key '{KEY_PREFIX}{module}.{pair_key(embedding, part)}' contains "
                                     "NaN or Inf values")
    like = {"device": layer.weight.device, "dtype": dtype or layer.weight.dtype}
    return PlannedLayer(module, lora_a.to(**like), lora_b.to(**like), module_scaling(config, module, rank),
                        planned_magnitude(adapter, module, fan_out, like), embedding)


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


def _check_target_set(model: nn.Module, adapter: AdapterFile, modules: dict[str, nn.Module]) -> None:
    """The file holds a pair for exactly the modules PEFT's target_modules selects (linear layers and, when
    named, embeddings)."""
    head = output_head(model)
    expected = {name for name, layer in modules.items() if peft_target_matches(adapter.config, name, head)
                and (is_linear(layer) or not _all_linear(adapter.config))}
    found = set(adapter.weights)
    where = adapter.path / WEIGHTS_FILE
    missing, extra = sorted(expected - found), sorted(found - expected)
    if missing:
        key = pair_key(is_embedding(modules[missing[0]]), "A")
        raise AdapterFormatError(
            f"{where}: missing key '{KEY_PREFIX}{missing[0]}.{key}' ({len(missing)} targeted modules "
            f"have no tensors): {CONFIG_FILE} target_modules={adapter.config['target_modules']!r} selects them"
        )
    if extra:
        raise AdapterFormatError(
            f"{where}: extra key '{KEY_PREFIX}{extra[0]}.{pair_key(extra[0] in adapter.embeddings, 'A')}' "
            f"({len(extra)} modules): not selected by {CONFIG_FILE} target_modules="
            f"{adapter.config['target_modules']!r}"
        )


def _all_linear(config: dict) -> bool:
    return config["target_modules"] == ALL_LINEAR


# --------------------------------------------------------------------------------------------- attaching
def attach_lora(model: nn.Module, name: str, planned: LoRAPlan, metadata: dict) -> AdapterRecord:
    """Add the checked layers (and token rows) of `planned` to `model` as adapter `name` (not activated)."""
    dropout = float(planned.adapter.config.get("lora_dropout") or 0.0)
    for layer in planned.layers:
        if layer.embedding:
            wrap_embedding(model, layer.module).add_lora(name, layer.lora_a, layer.lora_b, layer.scaling)
        else:
            wrap_linear(model, layer.module).add_adapter(name, layer.lora_a, layer.lora_b, layer.scaling, dropout,
                                                         magnitude=layer.magnitude)
    attach_tokens(model, name, planned.tokens)
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
        use_dora=bool(config.get("use_dora", False)),
        trainable_tokens=token_ids_of(config),
    )


# --------------------------------------------------------------------------------------------- saving
def save_lora(model: nn.Module, name: str, path: str | os.PathLike, metadata: dict) -> Path:
    """Write LoRA adapter `name` to directory `path` in PEFT's layout; each file is replaced atomically.

    `metadata` is merged into the config's "deltaw" section (e.g. how the adapter was trained).
    """
    record = require_adapter(model, name)
    parts = saved_parts(model, name)
    cfg = record.config
    deltaw = {key: value for key, value in record.metadata.items() if key != "fingerprint"}
    deltaw.update(fingerprint=model_fingerprint(model), targets=cfg.to_dict()["targets"],
                  exclude=list(cfg.exclude), init=cfg.init, **metadata)
    if cfg.trainable_tokens:
        deltaw["trainable_tokens"] = list(cfg.trainable_tokens)
    config = lora_config_dict(
        ranks=parts.ranks, scalings=parts.scalings,
        target_modules=target_modules_for(list(adaptable_modules(model, embeddings=True)), sorted(parts.weights)),
        use_rslora=cfg.use_rslora, dropout=cfg.dropout, init=cfg.init,
        base_model=getattr(getattr(model, "config", None), "_name_or_path", None),
        deltaw=deltaw, rank=cfg.rank, alpha=cfg.alpha, use_dora=bool(parts.magnitudes),
        trainable_token_indices=parts.token_indices,
    )
    write_adapter(path, parts.weights, config, parts.embeddings, parts.magnitudes, parts.tokens)
    return Path(path)


def write_adapter(path: str | os.PathLike, weights: dict[str, tuple[torch.Tensor, torch.Tensor]], config: dict,
                  embeddings: set[str] = frozenset(), magnitudes: dict[str, torch.Tensor] | None = None,
                  tokens: dict[str, torch.Tensor] | None = None) -> Path:
    """Write module -> (A [r, in], B [out, r]) (embeddings among them), DoRA magnitudes, token rows and
    `config` as a PEFT-layout directory, each file atomically."""
    return write_adapter_files(path, adapter_tensors(weights, embeddings, magnitudes, tokens), config)


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
    use_dora: bool = False,
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None,
) -> dict:
    """adapter_config.json for layers with these ranks and scalings: PEFT's keys, `rank` (default: the
    most common rank) as `r`, per-layer exceptions in rank_pattern/alpha_pattern; DoRA and token rows as PEFT
    writes them (`use_dora`, `trainable_token_indices`)."""
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
        "use_dora": use_dora,
        "trainable_token_indices": trainable_token_indices,
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
    variant = "DoRA, " if adapter.is_dora else ""
    lines = [
        f"adapter       {adapter.path}",
        f"type          {config['peft_type']} ({variant}use_rslora={config.get('use_rslora', False)})",
        f"base model    {config.get('base_model_name_or_path')}",
        f"rank          r={config['r']}, alpha={config['lora_alpha']}, per-layer ranks {dict(sorted(ranks.items()))}",
        f"targets       {config['target_modules']}",
        f"modules       {len(adapter.weights)} ({', '.join(f'{k}: {v}' for k, v in sorted(leaves.items()))})",
        *describe_parts(adapter),
        f"parameters    {adapter.num_parameters:,} ({', '.join(dtypes)})",
        f"size on disk  {size:,} bytes ({size / 2**20:.2f} MiB)",
        f"fingerprint   {deltaw.get('fingerprint', 'none (not written by deltaw)')}",
    ]
    extra = {k: v for k, v in deltaw.items() if k not in ("fingerprint", "targets", "exclude", "init",
                                                          "trainable_tokens")}
    if extra:
        lines.append(f"metadata      {json.dumps(extra, sort_keys=True)}")
    return "\n".join(lines)
