"""LoRA: a frozen linear layer plus any number of named low-rank adapters.

    x ──► W·x + b ─────────────────────────────┐
    │                                          (+)──► y
    └─► dropout ─► A [r, in] ─► B [out, r] ─► ·scaling

    y = W·x + b + scaling · B·(A·x),   scaling = alpha / r   (or alpha / sqrt(r), rsLoRA)

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2021);
Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA" (2023).

`LoRALinear` *replaces* an `nn.Linear` and keeps its `weight` and `bias` parameters under the same
names (the very same tensors), so the base model's state-dict keys and values are unchanged by
injection. A is initialised at random and B at zero, so a fresh adapter leaves the output
bit-identical. B·(A·x) is computed, never (B·A)·x.

Merging writes W + scaling·B·A into `weight` (the delta in float32, cast back to the weight's dtype)
after copying the unmerged weight into `unmerged_weight`; unmerging copies it back, so unmerge is exact
bit for bit and switching adapters by merge never drifts. The copy is made on the first merge and kept
as a reusable buffer (no allocation, no page faults on later merges) until
`unmerge_adapter(model, release_memory=True)`: its cost is one copy of each merged weight.

DoRA is one branch too: an adapter with a magnitude vector m [out] computes
g ⊙ (W·x + scaling·B·(A·x)) + b with g = m / ‖W + scaling·B·A‖_row; its math is in `dora.py`.

QLoRA is one branch: built from an `NF4Linear`, the layer's `weight` is an `NF4Weight` (4-bit, frozen)
and the base product runs through `linear_nf4`, which dequantizes block-wise on the fly. Merging into
an NF4 weight re-quantizes W + scaling·B·A, which is lossy: the layer records the error it introduced
(`merge_error`), and unmerging restores the original 4-bit weight exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from deltaw.adapters.lora import fused
from deltaw.adapters.lora.dora import DoRAOutput, adapted_row_norms, dora_gain, dora_weight
from deltaw.adapters.state import check_adapter_name
from deltaw.quant.linear import NF4Linear, linear_nf4
from deltaw.quant.nf4 import NF4Weight, quantize

class AdapterParameters(nn.Module):
    """Adapter name -> Parameter. Unlike nn.ParameterDict, any adapter name works (even 'copy' or
    'train'): entries live only in `_parameters`, never as attributes, so no name can clash with a
    method. State-dict keys are `<prefix>.<adapter name>`."""

    def __getitem__(self, name: str) -> nn.Parameter:
        return self._parameters[name]

    def __setitem__(self, name: str, value: nn.Parameter) -> None:
        self._parameters[name] = value

    def __delitem__(self, name: str) -> None:
        del self._parameters[name]

    def __contains__(self, name: object) -> bool:
        return name in self._parameters

    def __iter__(self):
        return iter(self._parameters)

    def __len__(self) -> int:
        return len(self._parameters)


class LoRALinear(nn.Module):
    """An nn.Linear with named low-rank adapters, at most one of them active at a time.

    Attributes:
        weight: [out, in], the frozen base weight (the original nn.Linear's parameter, or an NF4Weight).
        bias: [out] or None, the original bias.
        lora_A: adapter name -> [r, in].
        lora_B: adapter name -> [out, r].
        scaling: adapter name -> float.
        lora_magnitude: DoRA adapter name -> m [out] (absent for a plain LoRA adapter).
        active: the adapter added in forward, or None for the base layer.
        merged: the adapter currently added into `weight`, or None.
        unmerged_weight: [out, in] copy of the base weight, made by the first merge; it holds the base
            weight whenever `merged` is set, and is scratch space otherwise (the NF4 branch keeps the
            original NF4Weight instead).
        shared_input: the group of sibling layers that read the same input (q/k/v, gate/up) and train as
            one autograd node (deltaw.adapters.lora.fused), or None.
        merge_error: after a merge into an NF4 weight, ||Q(W + ΔW) − (W + ΔW)|| / ||ΔW|| (Frobenius):
            the re-quantization error relative to the update; None otherwise.
    """

    wraps_linear = True  # deltaw.adapters.targets counts it as the linear layer it replaced

    def __init__(self, base: nn.Linear | NF4Linear) -> None:
        super().__init__()
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.lora_A = AdapterParameters()
        self.lora_B = AdapterParameters()
        self.lora_magnitude = AdapterParameters()
        self.lora_dropout: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.active: str | None = None
        self.merged: str | None = None
        self.merge_error: float | None = None
        self.shared_input: fused.SharedInput | None = None
        self.register_buffer("unmerged_weight", None, persistent=False)

    @property
    def quantized(self) -> bool:
        """True when the base weight is stored as NF4 (QLoRA)."""
        return isinstance(self.weight, NF4Weight)

    # ----------------------------------------------------------------------------- adapters
    def add_adapter(
        self,
        name: str,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: float,
        dropout: float = 0.0,
        magnitude: torch.Tensor | None = None,
    ) -> None:
        """Attach adapter `name` with A: [r, in] and B: [out, r] (taken as given, not copied); a DoRA adapter
        also has its magnitude m: [out]."""
        check_adapter_name(name)
        rank = lora_a.shape[0]
        if lora_a.shape != (rank, self.in_features) or lora_b.shape != (self.out_features, rank):
            raise ValueError(
                f"adapter {name!r}: expected lora_A [{rank}, {self.in_features}] and lora_B "
                f"[{self.out_features}, {rank}], found {list(lora_a.shape)} and {list(lora_b.shape)}"
            )
        if magnitude is not None and magnitude.shape != (self.out_features,):
            raise ValueError(f"adapter {name!r}: expected a DoRA magnitude [{self.out_features}], "
                             f"found {list(magnitude.shape)}")
        self.lora_A[name] = nn.Parameter(lora_a, requires_grad=False)
        self.lora_B[name] = nn.Parameter(lora_b, requires_grad=False)
        if magnitude is not None:
            self.lora_magnitude[name] = nn.Parameter(magnitude, requires_grad=False)
        self.scaling[name] = float(scaling)
        self.lora_dropout[name] = float(dropout)

    def delete_adapter(self, name: str) -> None:
        """Remove adapter `name` from this layer (it must not be merged)."""
        if self.merged == name:
            raise RuntimeError(f"adapter {name!r} is merged; call unmerge_adapter(model) before deleting it")
        del self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
        del self.scaling[name]
        if name in self.lora_magnitude:
            del self.lora_magnitude[name]
        if self.active == name:
            self.active = None
        if not self.lora_A:
            self.unmerged_weight = None

    def has(self, name: str) -> bool:
        """Whether adapter `name` adapts this layer."""
        return name in self.lora_A

    def rank(self, name: str) -> int:
        """The rank r of adapter `name` in this layer."""
        return self.lora_A[name].shape[0]

    def is_dora(self, name: str) -> bool:
        """Whether adapter `name` is a DoRA adapter in this layer (it has a magnitude vector)."""
        return name in self.lora_magnitude

    def frozen_weight(self) -> torch.Tensor | NF4Weight:
        """The unmerged base weight as stored: a float tensor [out, in], or the original NF4Weight."""
        return self._original_nf4() if self.quantized else self.base_weight()

    def dora_norms(self, name: str) -> torch.Tensor:
        """‖W + scaling·B·A‖ per output row for adapter `name` [out] float32, no gradient (W dequantized if NF4).
        Computed afresh on every call, as PEFT does (see dora.py); serving computes it once per adapter."""
        return adapted_row_norms(self.frozen_weight(), self.lora_A[name], self.lora_B[name], self.scaling[name])

    # ----------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in] -> [..., out]."""
        name = self.active
        if name is None or self.merged is not None:
            return self._base(x, self.bias)
        if fused.fusable(self, name, x):  # training: one autograd node (with the siblings that share x)
            return self.shared_input.output(self, x) if self.shared_input else fused.lora_forward(x, [self], name)[0]
        dropout = self.lora_dropout[name]
        dropped = F.dropout(x, dropout, training=True) if dropout > 0 and self.training else x
        if name in self.lora_magnitude:
            return self._dora(x, dropped, name)
        return self._add_lora(self._base(x, self.bias), dropped, name)

    def _base(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """W·x (+ bias): [..., in] -> [..., out], dequantizing on the fly for an NF4 weight."""
        return linear_nf4(x, self.weight, bias) if self.quantized else F.linear(x, self.weight, bias)

    def _dora(self, x: torch.Tensor, dropped: torch.Tensor, name: str) -> torch.Tensor:
        """W·x + b + (g − 1) ⊙ W·x̃ + g ⊙ scaling·B·(A·x̃), g = m / ‖W + scaling·B·A‖_row detached, x̃ = the
        dropped-out input (x itself without dropout: then g ⊙ (W·x + scaling·B·(A·x)) + b). The terms are PEFT's,
        added in its order, in float32 (g is close to 1). x: [..., in] -> [..., out]."""
        gain = dora_gain(self.lora_magnitude[name], self.dora_norms(name)).float()
        result = self._base(x, self.bias)
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        lora_input = dropped if torch.is_autocast_enabled(x.device.type) else dropped.to(lora_a.dtype)
        lora_result = F.linear(F.linear(lora_input, lora_a), lora_b)
        if dropped is x:  # no dropout: the memory-lean form (see DoRAOutput)
            return DoRAOutput.apply(result, lora_result, gain, self.bias, self.scaling[name])
        change = (gain - 1) * self._base(dropped, None) + gain * lora_result * self.scaling[name]
        return (result + change).to(result.dtype)

    def _add_lora(self, y: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        """y + scaling·B·(A·x); y: [..., out], x: [..., in]. One fused multiply-add for B.

        Under autocast (bf16 training with fp32 adapter weights) the matmuls run in the autocast dtype;
        without it, mixed dtypes compute the adapter in its own dtype and cast the result back.
        """
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        scaling = self.scaling[name]
        mixed = x.dtype != lora_a.dtype or y.dtype != lora_b.dtype
        if mixed and not torch.is_autocast_enabled(x.device.type):
            delta = F.linear(F.linear(x.to(lora_a.dtype), lora_a), lora_b)
            return y + (delta * scaling).to(y.dtype)
        ax = F.linear(x, lora_a).reshape(-1, lora_a.shape[0])  # [tokens, r]
        out = torch.addmm(y.reshape(-1, self.out_features), ax, lora_b.t(), alpha=scaling)
        return out.view(y.shape)

    # ----------------------------------------------------------------------------- merging
    def delta_weight(self, name: str) -> torch.Tensor:
        """The change adapter `name` makes to the weight, float32 [out, in]: scaling·B·A, or for DoRA the
        merged weight minus the base weight."""
        if name in self.lora_magnitude:
            base = self.base_weight().float()
            return self.merged_weight(name, base).sub_(base)
        lora_a = self.lora_A[name].detach().float()
        lora_b = self.lora_B[name].detach().float()
        return (lora_b @ lora_a).mul_(self.scaling[name])

    def merged_weight(self, name: str, base: torch.Tensor) -> torch.Tensor:
        """The weight with adapter `name` merged into `base` [out, in] (float32): W + scaling·B·A, or DoRA's
        m ⊙ (W + scaling·B·A) / ‖W + scaling·B·A‖_row."""
        lora_a, lora_b = self.lora_A[name].detach(), self.lora_B[name].detach()
        if name in self.lora_magnitude:
            return dora_weight(base, lora_a, lora_b, self.scaling[name], self.lora_magnitude[name].detach())
        return torch.addmm(base.float(), lora_b.float(), lora_a.float(), alpha=self.scaling[name])

    @torch.no_grad()
    def merge_(self, name: str) -> None:
        """weight <- base weight + scaling·B·A (float32 arithmetic, rounded once to the weight's dtype).

        The base weight is first copied into `unmerged_weight` (a buffer reused across merges, so
        repeated merges allocate nothing). Merging while another adapter is merged replaces it: the
        sum always starts from that copy, so the result equals a fresh merge of `name` bit for bit.
        """
        if name not in self.lora_A:
            raise KeyError(f"adapter {name!r} is not in this layer; it has {list(self.lora_A)}")
        if self.merged == name:
            return
        if self.quantized:
            self._merge_nf4(name)
            return
        weight = self.weight.data
        if self.merged is None:
            if self.unmerged_weight is None or self.unmerged_weight.shape != weight.shape:
                self.unmerged_weight = torch.empty_like(weight)
            self.unmerged_weight.copy_(weight)
        lora_a, lora_b = self.lora_A[name].detach(), self.lora_B[name].detach()
        if weight.dtype == lora_a.dtype == lora_b.dtype and name not in self.lora_magnitude:
            # one pass: read the kept base, write the sum (no copy first); a bf16 GEMM accumulates in fp32
            # and rounds once, as the fp32 path below does
            torch.addmm(self.unmerged_weight, lora_b, lora_a, alpha=self.scaling[name], out=weight)
        else:
            weight.copy_(self.merged_weight(name, self.unmerged_weight))
        self.merged = name
        self.active = name

    def _original_nf4(self) -> NF4Weight:
        """The NF4 base weight as it was before any merge."""
        kept = self.__dict__.get("_unmerged_nf4")
        return self.weight if kept is None else kept

    @torch.no_grad()
    def _merge_nf4(self, name: str) -> None:
        """weight <- Q(the merged weight over dequantize(base)), re-quantized with the base's settings; the
        original NF4Weight is kept aside, so unmerge is exact. Sets `merge_error`."""
        base = self._original_nf4()
        dequantized = base.dequantize(torch.float32)
        target = self.merged_weight(name, dequantized)
        delta_norm = (target - dequantized).norm()
        if delta_norm == 0:  # nothing to add: re-quantizing would still move the block scales
            merged, self.merge_error = base, 0.0
        else:
            merged = quantize(target, base.blocksize, base.double_quant).to(base.device)
            merged.dtype = base.dtype
            self.merge_error = float(merged.dequantize(torch.float32).sub_(target).norm() / delta_norm)
        self.__dict__["_unmerged_nf4"] = base
        self.weight = merged
        self.merged = name
        self.active = name

    @torch.no_grad()
    def unmerge_(self, release_memory: bool = False) -> None:
        """Restore the base weight bit for bit; with `release_memory` also free the kept copy."""
        if self.merged is not None and self.quantized:
            self.weight = self.__dict__.pop("_unmerged_nf4").to(self.weight.device)
            self.merged, self.merge_error = None, None
        elif self.merged is not None:
            self.weight.data.copy_(self.unmerged_weight)
            self.merged = None
        if release_memory:
            self.unmerged_weight = None

    def unwrap(self) -> nn.Linear | NF4Linear:
        """The plain layer holding this layer's current weight (merged or not) and bias: an nn.Linear, or an
        NF4Linear for a 4-bit weight. Adapters are dropped."""
        if self.quantized:
            return NF4Linear(self.weight, self.bias)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = self.weight
        if self.bias is not None:
            linear.bias = self.bias
        return linear

    def base_weight(self) -> torch.Tensor:
        """The unmerged base weight [out, in], whether or not an adapter is merged (dequantized if NF4)."""
        if self.quantized:
            return self._original_nf4().dequantize()
        return self.weight if self.merged is None else self.unmerged_weight

    def extra_repr(self) -> str:
        ranks = {name: self.rank(name) for name in self.lora_A}
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, adapters={ranks}, active={self.active}, merged={self.merged}"
        )


def init_lora_weights(
    in_features: int,
    out_features: int,
    rank: int,
    init: str,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A fresh adapter: A [r, in] random, B [out, r] zero.

    "kaiming": A ~ U(-1/sqrt(in), 1/sqrt(in)), which is kaiming_uniform_(a=sqrt(5)) as in nn.Linear
    and PEFT's default. "gaussian": A ~ N(0, 1/r), PEFT's `init_lora_weights="gaussian"`.
    """
    lora_a = torch.empty(rank, in_features, dtype=torch.float32, device=device)
    if init == "kaiming":
        bound = 1.0 / math.sqrt(in_features)
        lora_a.uniform_(-bound, bound, generator=generator)
    elif init == "gaussian":
        lora_a.normal_(0.0, 1.0 / rank, generator=generator)
    else:
        raise ValueError(f"unknown LoRA init {init!r}: use 'kaiming' or 'gaussian'")
    lora_b = torch.zeros(out_features, rank, dtype=dtype, device=device)
    return lora_a.to(dtype), lora_b
