"""LoRAConfig: the hyper-parameters of one LoRA adapter."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from deltaw.lora import lora_scaling
from deltaw.targets import ALL_LINEAR, normalize_patterns

LORA_INITS = ("kaiming", "gaussian")


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

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str | Sequence[str] = ALL_LINEAR
    exclude: Sequence[str] = field(default_factory=tuple)
    use_rslora: bool = False
    init: str = "kaiming"

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


PREFIX_INITS = ("random", "activations")


@dataclass(frozen=True)
class PrefixConfig:
    """How to build a prefix-tuning adapter.

    Attributes:
        num_virtual_tokens: T, the number of key/value vectors prepended at every attention layer.
        projection_hidden: train the prefixes through an MLP (embedding [T, token_dim] -> Linear ->
            Tanh -> Linear -> [T, layers·2·token_dim]) with this hidden size, as in the prefix-tuning
            paper; None trains the prefixes directly. Files always hold the final prefixes.
        init: "random" (N(0, 1), as PEFT's nn.Embedding) or "activations" (the base model's own keys
            and values of T real tokens, so the prefix starts as a real prompt would).
    """

    num_virtual_tokens: int = 20
    projection_hidden: int | None = None
    init: str = "random"

    def __post_init__(self) -> None:
        for key in ("num_virtual_tokens", "projection_hidden"):
            value = getattr(self, key)
            if (value is not None or key == "num_virtual_tokens") and (
                    isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"PrefixConfig.{key} must be a positive integer, found {value!r}")
        if self.init not in PREFIX_INITS:
            raise ValueError(f"PrefixConfig.init must be one of {PREFIX_INITS}, found {self.init!r}")
        if self.init == "activations" and self.projection_hidden is not None:
            raise ValueError("PrefixConfig: init='activations' sets the prefixes themselves, which a projection "
                             "does not have; use init='random' with projection_hidden")

    def to_dict(self) -> dict:
        """A JSON-ready dict of the fields."""
        return asdict(self)
