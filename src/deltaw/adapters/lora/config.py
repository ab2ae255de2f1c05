"""LoRAConfig: the hyper-parameters of one LoRA adapter."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

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
            full-matched against dotted module names, e.g. [r".*\\.(q|v)_proj"].
        exclude: regular expressions (same syntax) removed from the targets.
        use_rslora: scaling = alpha/sqrt(rank) instead of alpha/rank.
        init: "kaiming" (uniform, as nn.Linear and PEFT) or "gaussian" (std 1/rank) for A; B is zero.
    """

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: str | Sequence[str] = field(default=ALL_LINEAR, metadata={"metavar": "PATTERN"})
    exclude: Sequence[str] = field(default_factory=tuple, metadata={"metavar": "PATTERN"})
    use_rslora: bool = False
    init: str = field(default="kaiming", metadata={"flag": "--lora-init", "choices": LORA_INITS})

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

    @property
    def scaling(self) -> float:
        """alpha/rank, or alpha/sqrt(rank) with use_rslora."""
        return lora_scaling(self.alpha, self.rank, self.use_rslora)

    def to_dict(self) -> dict:
        """A JSON-ready dict of the fields."""
        data = asdict(self)
        data["targets"] = self.targets if isinstance(self.targets, str) else list(self.targets)
        data["exclude"] = list(self.exclude)
        return data
