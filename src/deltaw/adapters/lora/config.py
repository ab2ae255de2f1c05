"""LoRAConfig: the hyper-parameters of one LoRA adapter."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

from deltaw.adapters.targets import ALL_LINEAR, normalize_patterns

LORA_INITS = ("kaiming", "gaussian")


def lora_scaling(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """The factor in front of B·A: alpha/rank, or alpha/sqrt(rank) for rank-stabilised LoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


@dataclass(frozen=True)
class LoRAConfig:
    """How to build a LoRA adapter.

    Attributes:
        rank: r, the inner dimension of B·A.
        alpha: the numerator of the scaling factor.
        dropout: dropout probability on the adapter's input (training only).
        targets: "all-linear" (every linear layer but the output head) or regular expressions
            full-matched against dotted module names, e.g. [r".*\\.(q|v)_proj"]; a pattern may also select
            the input embedding (e.g. r".*embed_tokens") and an untied output head (r"lm_head").
        exclude: regular expressions (same syntax) removed from the targets.
        use_rslora: scaling = alpha/sqrt(rank) instead of alpha/rank.
        init: "kaiming" (uniform, as nn.Linear and PEFT) or "gaussian" (std 1/rank) for A; B is zero.
        use_dora: DoRA: learn a magnitude per output row on top of the low-rank direction (linear layers).
        trainable_tokens: tokens whose input-embedding rows (and a tied head's) are trained, given as token
            strings or ids separated by commas, e.g. "<|im_start|>,<|im_end|>" or "1,2" (digits are ids).
    """

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: str | Sequence[str] = field(default=ALL_LINEAR, metadata={"metavar": "PATTERN"})
    exclude: Sequence[str] = field(default_factory=tuple, metadata={"metavar": "PATTERN"})
    use_rslora: bool = False
    init: str = field(default="kaiming", metadata={"flag": "--lora-init", "choices": LORA_INITS})
    use_dora: bool = False
    trainable_tokens: str | Sequence[int | str] = field(default=(), metadata={"metavar": "TOKENS"})

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRAConfig.rank must be a positive integer, found {self.rank!r}")
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ValueError(f"LoRAConfig.alpha must be a positive number, found {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRAConfig.dropout must be in [0, 1), found {self.dropout!r}")
        if self.init not in LORA_INITS:
            raise ValueError(f"LoRAConfig.init must be one of {LORA_INITS}, found {self.init!r}")
        targets = normalize_patterns(self.targets)
        object.__setattr__(self, "targets", ALL_LINEAR if targets == [ALL_LINEAR] else tuple(targets))
        object.__setattr__(self, "exclude", tuple(normalize_patterns(self.exclude)))
        object.__setattr__(self, "trainable_tokens", parse_tokens(self.trainable_tokens))

    @property
    def scaling(self) -> float:
        """alpha/rank, or alpha/sqrt(rank) with use_rslora."""
        return lora_scaling(self.alpha, self.rank, self.use_rslora)

    def to_dict(self) -> dict:
        """A JSON-ready dict of the fields."""
        data = asdict(self)
        data["targets"] = self.targets if isinstance(self.targets, str) else list(self.targets)
        data["exclude"] = list(self.exclude)
        data["trainable_tokens"] = list(self.trainable_tokens)
        return data

    def with_token_ids(self, tokenizer: object | None) -> LoRAConfig:
        """This config with every trainable token given as an id (token strings looked up in `tokenizer`)."""
        if all(isinstance(token, int) for token in self.trainable_tokens):
            return self
        return replace(self, trainable_tokens=token_ids(self.trainable_tokens, tokenizer))


def parse_tokens(tokens: str | Sequence[int | str]) -> tuple[int | str, ...]:
    """"<|im_start|>,2" or ["<|im_start|>", 2] -> ("<|im_start|>", 2): commas separate, digits are ids."""
    items = [tokens] if isinstance(tokens, str) else list(tokens)
    parsed: list[int | str] = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise ValueError(f"LoRAConfig.trainable_tokens: expected token strings or ids, found {item!r}")
        parts = [item] if isinstance(item, int) else [part.strip() for part in item.split(",") if part.strip()]
        parsed += [int(part) if isinstance(part, str) and part.isdigit() else part for part in parts]
    if len(set(parsed)) != len(parsed):
        raise ValueError(f"LoRAConfig.trainable_tokens: a token is listed twice in {parsed}")
    return tuple(parsed)


def token_ids(tokens: Sequence[int | str], tokenizer: object | None) -> tuple[int, ...]:
    """The ids of `tokens` (ids stay; strings are looked up in the tokenizer's vocabulary, never split)."""
    names = [token for token in tokens if isinstance(token, str)]
    if names and tokenizer is None:
        raise ValueError(f"trainable tokens {names} are given as text: pass their ids, or a tokenizer to look "
                         "them up (deltaw train does)")
    vocabulary = tokenizer.get_vocab() if names else {}
    missing = [name for name in names if name not in vocabulary]
    if missing:
        raise ValueError(f"trainable token {missing[0]!r} is not in the tokenizer's vocabulary ({len(vocabulary)} "
                         "tokens); deltaw trains existing rows only: add the token to the tokenizer and resize the "
                         "model's embeddings first, or give token ids")
    ids = tuple(token if isinstance(token, int) else int(vocabulary[token]) for token in tokens)
    if len(set(ids)) != len(ids):
        raise ValueError(f"trainable tokens {list(tokens)} name the same token twice (ids {list(ids)})")
    return ids
