"""Routed layers that read the same input, served as one: one GEMM for their base weights, one for their LoRA A's,
one for their B's (bf16 on a CPU, where the base weights are prepacked for oneDNN anyway).

In a Llama-style block, q_proj, k_proj and v_proj read the same hidden states, and so do gate_proj and up_proj
(`fused.SHARED_INPUTS`). Served one by one, each of those RoutedLinear layers makes three oneDNN calls (its base
weight, its stacked A's, its stacked B's), and at decode sizes (16 rows) a call costs ~20 µs however little it
computes: the LoRA delta then costs a quarter of a step. A `SiblingGroup` computes its m members together:

    base:   y = x·[W_1; ...; W_m]ᵀ + [b_1 ... b_m]                       [rows, seq, Σout]   (one prepacked GEMM)
    LoRA:   ax = x·[A_1; ...; A_m]ᵀ · [coef_1 ... coef_m]                [rows, seq, ΣK]     (the members' stacked
            y += ax·blockdiag(s·Bᵀ_1, ..., s·Bᵀ_m)                       [rows, seq, Σout]    factors, cached)
    out_i = y[..., offset_i : offset_i + out_i]                          a view per member

where A_i, s·Bᵀ_i and coef_i are member i's dense-path factors and coefficients for the routing (routed.py; a
member no adapter of the batch touches has none), so each row gets exactly the terms the members compute alone.
The block-diagonal B multiplies zeros off the diagonal: at decode sizes that is free, and it keeps one call.

The first member called computes every member's output and keeps the others' until they are called with the very
same input tensor (unchanged since, and under the same routing); any other call runs the member alone. So does a
group whose members cannot run together: an NF4 base, DoRA rows (a per-member gain), the many-adapter grouped path,
the per-row reference, gradients wanted, or a weight that is not packable (fp32, CUDA: a concatenated copy of the
weights there would be memory the per-layer path does not spend). The members keep their own weights (merging,
fingerprints and the per-layer path read them); the group holds the packed concatenation instead of the members'
packed copies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from deltaw.quant.nf4 import NF4Weight
from deltaw.quant.packed import THIN_ROWS, linear_packed, pack, packable

FACTOR_CACHE = 4  # member-factor combinations whose fused (packed) factors a group keeps
Block = tuple[tuple[int, int, int, int], torch.Tensor]
"""((out_start, out_end, k_start, k_end), s·Bᵀ [k_end − k_start, out_end − out_start]): a block of a delta's B."""


def add_delta(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, blocks: list[Block], coef: torch.Tensor,
              packed: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None) -> torch.Tensor:
    """y [rows, seq, out] += ((x·Aᵀ) · coef)·B, in place, for x [rows, seq, in], A [K, in], coef [rows, 1, K] and B
    given by its blocks. `packed` (bf16 on a CPU) gives A and the whole B prepacked, used up to THIN_ROWS rows
    (decode: two oneDNN calls); otherwise (prefill, or no packing) each block is accumulated into its columns of
    y by addmm_."""
    if packed is not None and x.numel() <= THIN_ROWS * x.shape[-1]:
        packed_a, packed_b = packed()
        return y.add_(linear_packed(linear_packed(x, packed_a, None).mul_(coef), packed_b, None))
    ax = F.linear(x, lora_a).mul_(coef).view(-1, lora_a.shape[0])  # [N, K]
    rows = y.view(-1, y.shape[-1])  # [N, out]
    for (out_start, out_end, k_start, k_end), lora_bt in blocks:
        rows[:, out_start:out_end].addmm_(ax[:, k_start:k_end], lora_bt)
    return y


class SiblingGroup:
    """RoutedLinear layers called one after another with the same input, computed together (see the module doc)."""

    def __init__(self, members: list[nn.Linear]) -> None:
        """members: RoutedLinear layers (routed.py imports this module, so the type is named by its base)."""
        self.members = members
        self.sizes = [member.out_features for member in members]
        self._pending: tuple | None = None  # (x, x._version, routing version, outputs not yet taken)
        self._weight: tuple[tuple, torch.Tensor, torch.Tensor | None] | None = None  # (key, packed W, bias)
        self._factors: list[_Fused] = []  # the last FACTOR_CACHE combinations of member factors
        self._coef: tuple[int, torch.Tensor] | None = None  # (routing version, [rows, 1, ΣK])

    def forward(self, member: nn.Linear, x: torch.Tensor) -> torch.Tensor | None:
        """`member`'s output [rows, seq, out] for x [rows, seq, in], computed with its siblings' (kept for them);
        None when the group cannot run together (the member then runs alone)."""
        index = self.members.index(member)
        version = member.routing.version
        pending = self._pending
        if pending is not None and pending[0] is x and pending[1] == _version(x) and pending[2] == version:
            output, pending[3][index] = pending[3][index], None
            if output is not None:
                if all(other is None for other in pending[3]):
                    self._pending = None
                return output
        outputs = self._compute(x)
        if outputs is None:
            return None
        output, outputs[index] = outputs[index], None
        self._pending = (x, _version(x), version, outputs)
        return output

    def release(self) -> None:
        """Forget cached weights and factors (a member's slots or placement changed)."""
        self._pending, self._weight, self._coef = None, None, None
        self._factors.clear()

    def _compute(self, x: torch.Tensor) -> list[torch.Tensor | None] | None:
        members = self.members
        if any(isinstance(m.weight, NF4Weight) or not packable(m.weight, x) for m in members):
            return None
        plans = [m.current_plan() for m in members]
        if any(gain is not None or not _dense(plan) for plan, gain in plans):
            return None
        packed, bias = self._packed_weight()
        y = linear_packed(x, packed, bias)  # [rows, seq, Σout]
        present = [(index, plan) for index, (plan, _) in enumerate(plans) if plan is not None]
        if present:
            fused = self._fused_factors(present)
            add_delta(y, x, fused.lora_a, fused.blocks, self._coefficients(present, members[0].routing.version),
                      fused.packed)
        return list(y.split(self.sizes, dim=-1))

    def _packed_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[W_1; ...; W_m] prepacked and the concatenated bias (None when no member has one), packed again when a
        member's weight or bias changes."""
        key = tuple((t.data_ptr(), t._version) if t is not None else None
                    for m in self.members for t in (m.weight, m.bias))
        if self._weight is None or self._weight[0] != key:
            weight = torch.cat([m.weight.detach() for m in self.members])
            bias = None
            if any(m.bias is not None for m in self.members):
                bias = torch.cat([m.bias.detach() if m.bias is not None else m.weight.new_zeros(m.out_features)
                                  for m in self.members])
            self._weight = (key, pack(weight), bias)
        return self._weight[1], self._weight[2]

    def _fused_factors(self, present: list[tuple[int, tuple]]) -> _Fused:
        """The present members' factors together (see `_Fused`), cached by the members' factor objects (which the
        members renew when a slot changes)."""
        factors = tuple((index, plan[0]) for index, plan in present)
        for fused in self._factors:
            if len(fused.key) == len(factors) and all(i == j and a is b for (i, a), (j, b) in zip(fused.key, factors)):
                return fused
        offsets = [sum(self.sizes[:index]) for index in range(len(self.sizes))]
        blocks, column = [], 0
        for index, f in factors:
            rank, start = f.lora_a.shape[0], offsets[index]
            blocks.append(((start, start + self.sizes[index], column, column + rank), f.lora_bt))
            column += rank
        fused = _Fused(factors, torch.cat([f.lora_a for _, f in factors]), blocks, sum(self.sizes))
        self._factors = [fused, *self._factors[:FACTOR_CACHE - 1]]
        return fused

    def _coefficients(self, present: list[tuple[int, tuple]], version: int) -> torch.Tensor:
        """The present members' coefficients side by side [rows, 1, ΣK], once per routing."""
        if self._coef is None or self._coef[0] != version:
            self._coef = (version, torch.cat([plan[1] for _, plan in present], dim=-1))
        return self._coef[1]


@dataclass
class _Fused:
    """Member factors served together: A [ΣK, in] stacked, each member's s·Bᵀ [K_i, out_i] with its place
    ((out_start, out_end, k_start, k_end)) in the block-diagonal [Σout, ΣK], and (made on first use, by decode:
    a prefill's factors are often of a passing combination of slots) A and the block-diagonal B prepacked."""

    key: tuple
    lora_a: torch.Tensor
    blocks: list[Block]
    outputs: int  # Σout
    _packed: tuple[torch.Tensor, torch.Tensor] | None = None

    def packed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, block-diagonal B [Σout, ΣK]) in oneDNN's blocked layout."""
        if self._packed is None:
            lora_b = self.lora_a.new_zeros(self.outputs, self.lora_a.shape[0])
            for (out_start, out_end, k_start, k_end), lora_bt in self.blocks:
                lora_b[out_start:out_end, k_start:k_end] = lora_bt.t()
            self._packed = (pack(self.lora_a), pack(lora_b))
        return self._packed


def _version(x: torch.Tensor) -> int:
    """x's in-place version counter (an inference tensor has none: -1)."""
    return -1 if x.is_inference() else x._version


def _dense(plan: tuple | None) -> bool:
    """Whether a member's plan is nothing or the dense path's (factors, coef) (not the grouped path's)."""
    return plan is None or len(plan) == 2


def group_siblings(model: nn.Module, is_routed: Callable[[nn.Module], bool],
                   names: tuple[tuple[str, ...], ...]) -> list[SiblingGroup]:
    """A SiblingGroup for every module of `model` whose children named by one entry of `names` are all routed
    layers with the same input size and weight dtype; each member gets `group` set."""
    groups = []
    for module in model.modules():
        for siblings in names:
            members = [getattr(module, name, None) for name in siblings]
            if not all(member is not None and is_routed(member) for member in members):
                continue
            if len({(m.in_features, m.weight.dtype, m.weight.device) for m in members}) != 1:
                continue
            group = SiblingGroup(members)
            for member in members:
                member.group = group
            groups.append(group)
    return groups
