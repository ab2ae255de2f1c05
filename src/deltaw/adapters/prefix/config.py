"""PrefixConfig: the hyper-parameters of one prefix-tuning adapter."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

PREFIX_INITS = ("random", "activations")


@dataclass(frozen=True)
class PrefixConfig:
    """How to build a prefix-tuning adapter.

    Attributes:
        num_virtual_tokens: T, the key/value vectors prepended at every attention layer.
        projection: train the prefixes through an MLP (embedding [T, token_dim] -> Linear -> Tanh -> Linear
            -> [T, layers·2·token_dim]), as the prefix-tuning paper and PEFT's prefix_projection do, with an
            equalized learning rate (PrefixEncoder says why); the saved adapter holds the prefixes the MLP produced.
        projection_hidden: the hidden size of that MLP (PEFT's encoder_hidden_size).
        init: "activations": the base model's own keys and values of the first T training tokens, so the
            prefix starts as that real prompt would; "random": N(0, 1), as PEFT. Default: activations when
            at least T training tokens are given and there is no projection, else random.
    """

    num_virtual_tokens: int = 20
    projection: bool = field(default=False, metadata={"flag": "--prefix-projection"})
    projection_hidden: int = 512
    init: str | None = field(default=None, metadata={"flag": "--prefix-init", "choices": PREFIX_INITS})

    def __post_init__(self) -> None:
        for key in ("num_virtual_tokens", "projection_hidden"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PrefixConfig.{key} must be a positive integer, found {value!r}")
        if self.init is not None and self.init not in PREFIX_INITS:
            raise ValueError(f"PrefixConfig.init must be one of {PREFIX_INITS}, found {self.init!r}")
        if self.init == "activations" and self.projection:
            raise ValueError("PrefixConfig: init 'activations' sets the prefixes themselves, which the projection "
                             "produces instead; use init 'random' (--prefix-init random) with a projection")

    def resolved_init(self, have_tokens: bool) -> str:
        """The init used: `init`, or by default activations when tokens are given and there is no projection."""
        if self.init is not None:
            return self.init
        return "activations" if have_tokens and not self.projection else "random"

    def to_dict(self) -> dict:
        """A JSON-ready dict of the fields."""
        return asdict(self)
