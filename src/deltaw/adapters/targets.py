r"""Which modules an adapter adapts: one syntax, loud errors.

`targets` is either "all-linear" (every linear layer but the output head) or regular expressions,
each *full-matched* against dotted module names such as `model.layers.3.self_attn.q_proj`. A single
string means the same as a list holding it (PEFT treats the two differently: peft#2964). A pattern
selects the adaptable layers among the modules it matches (linear layers, and for LoRA embeddings
too), so `model\.layers\.0\..*` adapts that block's linear layers. `exclude` uses the same syntax. A
pattern that matches no module, or no adaptable layer, is an error that names it and lists the closest
module names (PEFT lets such a pattern match nothing: peft#3658). A linear layer whose weight is tied
to another module's (a tied output head) is refused: merging would change both.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from deltaw.quant.linear import NF4Linear

ALL_LINEAR = "all-linear"


class TargetError(ValueError):
    """A target or exclude pattern that cannot be applied to the model."""


@dataclass(frozen=True)
class Selection:
    """The modules chosen for an adapter.

    Attributes:
        modules: dotted module names, in model order.
        per_pattern: pattern -> the names it matched (before exclusions).
    """

    modules: list[str]
    per_pattern: dict[str, list[str]]


def normalize_patterns(patterns: str | Sequence[str]) -> list[str]:
    """A string is one pattern; a sequence is many. Returns a list of strings."""
    if isinstance(patterns, str):
        return [patterns]
    result = list(patterns)
    for pattern in result:
        if not isinstance(pattern, str):
            raise TargetError(f"target patterns must be strings, found {pattern!r} ({type(pattern).__name__})")
    return result


def is_linear(module: nn.Module) -> bool:
    """An nn.Linear, a frozen NF4Linear, or an adapter layer standing in for one (it sets `wraps_linear`)."""
    return isinstance(module, (nn.Linear, NF4Linear)) or getattr(module, "wraps_linear", False)


def is_embedding(module: nn.Module) -> bool:
    """An nn.Embedding, or an adapter layer standing in for one (it sets `wraps_embedding`)."""
    return isinstance(module, nn.Embedding) or getattr(module, "wraps_embedding", False)


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear layer of `model` (see is_linear) by dotted name, in model order."""
    return {name: module for name, module in model.named_modules() if is_linear(module)}


def adaptable_modules(model: nn.Module, embeddings: bool = False) -> dict[str, nn.Module]:
    """Every linear layer, and with `embeddings` every embedding, of `model` by dotted name, in model order."""
    return {name: module for name, module in model.named_modules()
            if is_linear(module) or (embeddings and is_embedding(module))}


def input_embedding(model: nn.Module) -> str | None:
    """The dotted name of the model's input embedding (embed_tokens), if it has one."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    return next((name for name, module in model.named_modules() if module is embeddings), None)


def tied_weight_modules(model: nn.Module) -> dict[str, list[str]]:
    """Module name -> the other modules sharing its weight tensor, for every module that shares one (e.g. a
    tied lm_head and embed_tokens)."""
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name.rsplit(".", 1)[0])
    return {module: [other for other in names if other != module]
            for names in owners.values() if len(names) > 1 for module in names}


def output_head(model: nn.Module) -> str | None:
    """The dotted name of the model's output projection (lm_head), if it has one."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        return None
    return next((name for name, module in model.named_modules() if module is head), None)


def select_modules(
    model: nn.Module, targets: str | Sequence[str], exclude: str | Sequence[str] = (), embeddings: bool = False
) -> Selection:
    """Resolve `targets` minus `exclude` to linear module names (and embedding names with `embeddings`),
    or raise TargetError."""
    linears = adaptable_modules(model, embeddings)
    all_names = [name for name, _ in model.named_modules() if name]
    patterns = normalize_patterns(targets)
    per_pattern: dict[str, list[str]] = {}
    if patterns == [ALL_LINEAR]:
        head = output_head(model)
        per_pattern[ALL_LINEAR] = [name for name in linears if name != head and is_linear(linears[name])]
        if not per_pattern[ALL_LINEAR]:
            raise TargetError("targets='all-linear' found no nn.Linear layers besides the output head")
    else:
        for pattern in patterns:
            matched = _full_matches(pattern, all_names)
            linear_matches = [name for name in matched if name in linears]
            if not linear_matches:
                kind = type(model.get_submodule(matched[0])).__name__
                what = "linear or embedding layer" if embeddings else "linear layer"
                raise TargetError(
                    f"target pattern {pattern!r} matches {matched[0]!r}, a {kind}, and no {what}; "
                    f"LoRA adapts {'nn.Linear and nn.Embedding' if embeddings else 'nn.Linear'} modules only: "
                    f"match the layers inside it, e.g. {matched[0] + '.*'!r}"
                )
            per_pattern[pattern] = linear_matches
    chosen = {name for names in per_pattern.values() for name in names}
    for pattern in normalize_patterns(exclude):
        excluded = _full_matches(pattern, all_names, role="exclude")
        chosen -= set(excluded)
    shared = tied_weight_modules(model)
    tied = sorted(name for name in chosen if name in shared and is_linear(model.get_submodule(name)))
    if tied:
        raise TargetError(
            f"{tied[0]!r} shares its weight with {shared[tied[0]][0]!r} (tied embeddings); LoRA on it would also "
            "change that module when merged. Remove it from targets (or add it to exclude) and adapt the embedding "
            f"instead: LoRA on the input embedding (a target matching {shared[tied[0]][0]!r}), or trainable tokens "
            "for chosen rows of both (--trainable-tokens, LoRAConfig.trainable_tokens)."
        )
    if not chosen:
        raise TargetError(f"targets {patterns} minus exclude {normalize_patterns(exclude)} leave no module to adapt")
    return Selection(modules=[name for name in linears if name in chosen], per_pattern=per_pattern)


def _full_matches(pattern: str, names: list[str], role: str = "target") -> list[str]:
    """Names that `pattern` full-matches; a pattern matching nothing is a TargetError."""
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise TargetError(f"{role} pattern {pattern!r} is not a valid regular expression: {exc}") from exc
    matched = [name for name in names if regex.fullmatch(name)]
    if not matched:
        raise TargetError(_no_match_message(pattern, names, role))
    return matched


def _no_match_message(pattern: str, names: list[str], role: str) -> str:
    """Explain a pattern that matched nothing, with the closest module names."""
    leaves = sorted({name.rsplit(".", 1)[-1] for name in names})
    message = f"{role} pattern {pattern!r} matches no module (patterns are full-matched against dotted names)."
    if pattern in leaves:
        example = next(name for name in names if name.rsplit(".", 1)[-1] == pattern)
        suggestion = r".*\." + pattern
        message += f" To match every module named {pattern!r} (e.g. {example!r}) use {suggestion!r}."
    close = difflib.get_close_matches(pattern, names, n=5, cutoff=0.3) or names[:5]
    return message + f" Close module names: {close}"
