"""Putting LoRA into a model: wrap its linear layers in LoRALinear (its embedding in LoRAEmbedding) and add a
fresh adapter: LoRA or DoRA on the targets, and trainable token rows if asked."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from deltaw.adapters.lora.dora import initial_magnitude
from deltaw.adapters.lora.config import LoRAConfig
from deltaw.adapters.lora.embedding import LoRAEmbedding, TokenHead
from deltaw.adapters.lora.fused import join_siblings
from deltaw.adapters.lora.layer import LoRALinear, init_lora_weights
from deltaw.adapters.manage import set_adapter
from deltaw.adapters.state import AdapterRecord, adapters_of, check_new_name, count_parameters
from deltaw.adapters.targets import Selection, input_embedding, is_embedding, output_head, select_modules
from deltaw.quant.linear import NF4Linear

AdapterLayer = LoRALinear | LoRAEmbedding | TokenHead


@dataclass(frozen=True)
class LoRAReport:
    """What add_lora did: modules per pattern and parameter counts."""

    name: str
    config: LoRAConfig
    selection: Selection
    trainable: int
    total: int

    def __str__(self) -> str:
        cfg = self.config
        variant = "DoRA" if cfg.use_dora else "LoRA"
        lines = [
            f"adapter {self.name!r}: {variant} rank {cfg.rank}, alpha {cfg.alpha:g} (scaling {cfg.scaling:g}), "
            f"{len(self.selection.modules)} modules"
        ]
        for pattern, names in self.selection.per_pattern.items():
            lines.append(f"  {pattern:<40} {len(names):>5} modules")
        if cfg.trainable_tokens:
            lines.append(f"  trainable token rows: {list(cfg.trainable_tokens)}")
        lines.append(f"trainable {self.trainable:,} / {self.total:,} ({100 * self.trainable / self.total:.2f}%)")
        return "\n".join(lines)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """Every LoRALinear in the model with its dotted name."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """Every layer holding LoRA-kind adapters (LoRALinear, LoRAEmbedding, TokenHead) with its dotted name."""
    for name, module in model.named_modules():
        if isinstance(module, (LoRALinear, LoRAEmbedding, TokenHead)):
            yield name, module


def merged_lora(model: nn.Module) -> str | None:
    """The LoRA adapter merged into the weights now, or None."""
    return next((layer.merged for _, layer in adapter_layers(model) if layer.merged), None)


def wrap_linear(model: nn.Module, module_name: str) -> LoRALinear:
    """Replace the nn.Linear (or NF4Linear) at `module_name` by a LoRALinear holding the same weight and bias."""
    module = model.get_submodule(module_name)
    if isinstance(module, LoRALinear):
        return module
    if isinstance(module, TokenHead):
        raise ValueError(f"{module_name!r} is a tied head following trainable token rows; it takes no LoRA")
    if not isinstance(module, (nn.Linear, NF4Linear)):
        raise TypeError(f"{module_name!r} is a {type(module).__name__}, not nn.Linear")
    layer = LoRALinear(module)
    model.set_submodule(module_name, layer)
    join_siblings(model, module_name, layer)
    return layer


def wrap_embedding(model: nn.Module, module_name: str) -> LoRAEmbedding:
    """Replace the nn.Embedding at `module_name` by a LoRAEmbedding holding the same weight."""
    module = model.get_submodule(module_name)
    if isinstance(module, LoRAEmbedding):
        return module
    if not isinstance(module, nn.Embedding):
        raise TypeError(f"{module_name!r} is a {type(module).__name__}, not nn.Embedding")
    layer = LoRAEmbedding(module)
    model.set_submodule(module_name, layer)
    return layer


def wrap_tied_head(model: nn.Module, embedding: LoRAEmbedding) -> TokenHead | None:
    """If the model's output head shares the embedding's weight, make it follow the embedding's token rows."""
    head_name = output_head(model)
    head = model.get_submodule(head_name) if head_name else None
    if isinstance(head, TokenHead) or head is None or getattr(head, "weight", None) is not embedding.base_weight():
        return head if isinstance(head, TokenHead) else None
    if not isinstance(head, nn.Linear):
        raise ValueError(f"the output head {head_name!r} ({type(head).__name__}) shares the embedding's weight but "
                         "is not a plain nn.Linear; trainable tokens cannot follow it")
    wrapped = TokenHead(head, embedding)
    model.set_submodule(head_name, wrapped)
    return wrapped


def add_lora(model: nn.Module, config: LoRAConfig, name: str = "default", dtype: torch.dtype | None = None,
             tokenizer: object | None = None) -> LoRAReport:
    """Add a fresh LoRA adapter `name` to `model`, make it active and the only trainable parameters.

    A is random (config.init), B is zero, so the model's output is unchanged until training (on an
    embedding A is zero and B random, as PEFT; DoRA's magnitude starts at ‖W‖_row; token rows start as the
    rows they replace). Adapter weights take the dtype of each base weight unless `dtype` is given (e.g.
    float32 adapters on a bf16 base for training). Trainable tokens given as text are looked up in
    `tokenizer`. Returns a report; print it to see the counts.
    """
    check_new_name(model, name)
    merged = merged_lora(model)
    if merged is not None:
        raise RuntimeError(f"adapter {merged!r} is merged; call unmerge_adapter(model) before adding an adapter")
    token_ids = config.with_token_ids(tokenizer).trainable_tokens
    selection = select_modules(model, config.targets, config.exclude, embeddings=True)
    _check_before_adding(model, config, selection, token_ids)
    for param in model.parameters():
        param.requires_grad_(False)
    params = [param for module_name in selection.modules
              for param in _add_to_module(model, module_name, config, name, dtype)]
    if token_ids:
        params += add_token_rows(model, name, list(token_ids), dtype)
    for param in params:
        param.requires_grad_(True)
    adapters_of(model).adapters[name] = AdapterRecord(kind="lora", config=config)
    set_adapter(model, name)
    trainable, total = count_parameters(model)
    return LoRAReport(name=name, config=config, selection=selection, trainable=trainable, total=total)


def _check_before_adding(model: nn.Module, config: LoRAConfig, selection: Selection,
                         token_ids: tuple[int, ...]) -> None:
    """Raise ValueError for what cannot be added, before the model is touched."""
    embeddings = [name for name in selection.modules if is_embedding(model.get_submodule(name))]
    if config.use_dora and embeddings:
        raise ValueError(f"DoRA is for linear layers; {embeddings[0]!r} is an embedding: remove it from the targets, "
                         "or train it with plain LoRA or trainable tokens in a separate adapter")
    if not token_ids:
        return
    embedding_name = input_embedding(model)
    if embedding_name is None or not is_embedding(model.get_submodule(embedding_name)):
        raise ValueError(f"trainable tokens need an input embedding (nn.Embedding); {type(model).__name__} has none")
    if embedding_name in embeddings:
        raise ValueError(f"trainable tokens and LoRA on the same embedding {embedding_name!r}: choose one (exclude "
                         "it from targets, or drop the trainable tokens)")
    rows = model.get_submodule(embedding_name).weight.shape[0]
    bad = [token for token in token_ids if not 0 <= token < rows]
    if bad:
        raise ValueError(f"trainable token id {bad[0]} is outside the embedding's {rows} rows")


def _add_to_module(model: nn.Module, module_name: str, config: LoRAConfig, name: str,
                   dtype: torch.dtype | None) -> list[nn.Parameter]:
    """Give module `module_name` a fresh adapter `name` of `config`; returns its parameters."""
    if is_embedding(model.get_submodule(module_name)):
        embedding = wrap_embedding(model, module_name)
        like = {"dtype": dtype or embedding.weight.dtype, "device": embedding.weight.device}
        lora_a = torch.zeros(config.rank, embedding.num_embeddings, **like)
        lora_b = torch.randn(embedding.embedding_dim, config.rank, device=like["device"]).to(like["dtype"])
        embedding.add_lora(name, lora_a, lora_b, config.scaling)
        return embedding.trainable(name)
    layer = wrap_linear(model, module_name)
    lora_a, lora_b = init_lora_weights(
        layer.in_features, layer.out_features, config.rank, config.init,
        dtype or layer.weight.dtype, layer.weight.device,
    )
    magnitude = None
    if config.use_dora:
        magnitude = initial_magnitude(layer.frozen_weight()).to(dtype or lora_a.dtype)
    layer.add_adapter(name, lora_a, lora_b, config.scaling, config.dropout, magnitude=magnitude)
    return [layer.lora_A[name], layer.lora_B[name], *([layer.lora_magnitude[name]] if config.use_dora else [])]


def add_token_rows(model: nn.Module, name: str, token_ids: list[int], dtype: torch.dtype | None) -> list[nn.Parameter]:
    """Make rows `token_ids` of the input embedding (and of a tied head) adapter `name`'s trainable rows,
    starting from their current values. Returns the new parameter."""
    embedding = wrap_embedding(model, input_embedding(model))
    rows = embedding.base_weight().detach()[torch.tensor(token_ids, device=embedding.weight.device)]
    embedding.add_tokens(name, token_ids, rows.to(dtype or rows.dtype).clone())
    wrap_tied_head(model, embedding)
    return embedding.trainable(name)
