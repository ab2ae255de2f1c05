"""A linear layer that adds a different LoRA adapter to every row of a batch (multi-tenant serving).

Every adapter the bank holds lives in one slot of three stacked, zero-padded buffers per layer:

    lora_a   [slots, r_max, in]     A of the adapter in each slot, rows past its rank are zero
    lora_bt  [slots, r_max, out]    Bᵀ (B is [out, r]), rows past its rank are zero
    scaling  [slots]                alpha/r (or alpha/√r), 0 where the slot's adapter skips this layer

(B is stored transposed so that the slots a batch uses, side by side, are one contiguous block of
both buffers: the stack below is then a view, not a copy.)

A batch's `Routing` (shared by every layer, set once per batch composition) names the distinct slots
the batch uses and a weight per row and slot (1 for a row's adapter, w_i for each adapter of a
weighted mix, 0 elsewhere; an all-zero row is the base model). Each layer takes the block of slots
lo..hi that covers them (a view; a gathered copy when the block would be mostly unused slots) and
computes every row's delta with two matmuls, whatever the mix of adapters:

    x [rows, seq, in] ──► W·x + b ─────────────────────────────────────────────────────┐
        │                                                                             (+)──► y [rows, seq, out]
        └─► A_stack [n·r_max, in] ─► ax [rows, seq, n·r_max] ─► · coef ─► Bt_stack [n·r_max, out]
                                           coef[row, j·r_max + k] = weight[row, slot_j] · scaling[slot_j]

so a row gets Σ_j weight[row, j] · scaling_j · B_j (A_j x): its adapter, the exact weighted sum of a
mix's adapters, or nothing. Padding ranks and zero weights add exact zeros. This reads each adapter
in the batch once per step (memory traffic, which bounds decoding, is what one adapter costs times
the number of distinct adapters), at the price of rows × n·r_max multiply-adds instead of rows × r. The layer keeps `weight`
and `bias` under nn.Linear's names (it *is* an nn.Linear), so everything that finds a model's linear
layers (adapter validation, fingerprints) sees the same model. `reference_forward` computes the same
thing with a Python loop per row and per adapter and the plain LoRA math y = W·x + b + s·B(A·x); tests
hold the fast path to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

Route = tuple[tuple[int, float], ...]
"""A row's adapters: ((slot, weight), ...); () is the base model."""


@dataclass
class Routing:
    """The current batch's adapter assignment, read by every RoutedLinear.

    Attributes:
        routes: one Route per batch row.
        slots: [u] the distinct slots the batch uses (int64), or None when every row is the base model.
        weights: [rows, u] weight of slot `slots[j]` in row i (float32).
        version: bumped whenever routes or slot contents change; layers rebuild their stacks on change.
        reference: compute with the slow per-row loop (for tests) instead of the stacked matmuls.
    """

    routes: list[Route] = field(default_factory=list)
    slots: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    version: int = 0
    reference: bool = False

    def set(self, routes: list[Route]) -> None:
        """Route row i of the next forward passes to `routes[i]` (a no-op when nothing changed)."""
        routes = [tuple(route) for route in routes]
        if routes == self.routes:
            return
        self.routes = routes
        distinct = sorted({slot for route in routes for slot, _ in route})
        if not distinct:
            self.slots = self.weights = None
        else:
            column = {slot: j for j, slot in enumerate(distinct)}
            weights = torch.zeros(len(routes), len(distinct))
            for row, route in enumerate(routes):
                for slot, weight in route:
                    weights[row, column[slot]] += weight
            self.slots, self.weights = torch.tensor(distinct, dtype=torch.long), weights
        self.version += 1

    def invalidate(self) -> None:
        """Slot contents changed: make every layer rebuild its stack."""
        self.version += 1


class RoutedLinear(nn.Linear):
    """nn.Linear plus per-row LoRA deltas from stacked adapter slots (see the module docstring).

    Attributes:
        weight: [out, in], the base weight (the original layer's Parameter, not a copy).
        bias: [out] or None.
        lora_a: [slots, r_max, in] or None before any adapter targets this layer.
        lora_bt: [slots, r_max, out] (B transposed) or None.
        scaling: [slots] float32.
        ranks: the rank stored in each slot (0: the slot's adapter does not target this layer).
    """

    def __init__(self, base: nn.Linear, routing: Routing) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.routing = routing
        self.register_buffer("lora_a", None, persistent=False)
        self.register_buffer("lora_bt", None, persistent=False)
        self.register_buffer("scaling", None, persistent=False)
        self.ranks: list[int] = []
        self._stack: tuple[int, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None] | None = None

    # ----------------------------------------------------------------------------- slots
    def reserve(self, slots: int, rank: int) -> None:
        """Grow the buffers (zero-padded, contents kept) to at least `slots` slots of rank `rank`."""
        old_slots = 0 if self.lora_a is None else self.lora_a.shape[0]
        old_rank = 0 if self.lora_a is None else self.lora_a.shape[1]
        if slots <= old_slots and rank <= old_rank:
            return
        slots, rank = max(slots, old_slots), max(rank, old_rank)
        like = {"dtype": self.weight.dtype, "device": self.weight.device}
        lora_a = torch.zeros(slots, rank, self.in_features, **like)
        lora_bt = torch.zeros(slots, rank, self.out_features, **like)
        scaling = torch.zeros(slots, dtype=torch.float32, device=self.weight.device)
        if self.lora_a is not None:
            lora_a[:old_slots, :old_rank] = self.lora_a
            lora_bt[:old_slots, :old_rank] = self.lora_bt
            scaling[:old_slots] = self.scaling
        self.lora_a, self.lora_bt, self.scaling = lora_a, lora_bt, scaling
        self.ranks += [0] * (slots - len(self.ranks))

    @torch.no_grad()
    def write_slot(self, slot: int, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> None:
        """Store A [r, in] and B [out, r] in `slot`, zero-padded to r_max."""
        rank = lora_a.shape[0]
        self.reserve(slot + 1, rank)
        self.lora_a[slot].zero_()
        self.lora_bt[slot].zero_()
        self.lora_a[slot, :rank] = lora_a
        self.lora_bt[slot, :rank] = lora_b.t()
        self.scaling[slot] = scaling
        self.ranks[slot] = rank

    @torch.no_grad()
    def clear_slot(self, slot: int) -> None:
        """Zero `slot` (its adapter does not target this layer)."""
        if self.lora_a is not None and slot < self.lora_a.shape[0]:
            self.lora_a[slot].zero_()
            self.lora_bt[slot].zero_()
            self.scaling[slot] = 0.0
            self.ranks[slot] = 0

    # ----------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [rows, seq, in] -> [rows, seq, out], row i with the adapters of `routing.routes[i]`."""
        y = F.linear(x, self.weight, self.bias)
        routing = self.routing
        if routing.slots is None or self.lora_a is None:
            return y
        if routing.reference:
            return y + self.reference_delta(x)
        if self._stack is None or self._stack[0] != routing.version:
            self._stack = (routing.version, *self._build_stack())
        _, lora_a, lora_bt, coef = self._stack
        if lora_a is None:
            return y
        ax = F.linear(x, lora_a).mul_(coef)  # [rows, seq, n·r_max]
        return y.add_(torch.matmul(ax, lora_bt))

    def _build_stack(self) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(A_stack [n·r_max, in], Bt_stack [n·r_max, out], coef [rows, 1, n·r_max]) for the current
        routing: the block of slots lo..hi covering the batch's slots (a view), or those slots gathered
        when the block would be more than half unused; (None, None, None) when no adapter of the batch
        touches this layer."""
        routing = self.routing
        stored = self.lora_a.shape[0]
        slots, weights = routing.slots, routing.weights
        keep = slots < stored  # slots beyond this layer's buffers hold nothing here
        slots, weights = slots[keep], weights[:, keep]
        coef = weights * self.scaling.cpu()[slots]  # [rows, distinct]
        used = coef.any(dim=0)
        slots, coef = slots[used], coef[:, used]
        if len(slots) == 0:
            return None, None, None
        low, high = int(slots[0]), int(slots[-1]) + 1
        if high - low <= 2 * len(slots):
            block = torch.zeros(coef.shape[0], high - low)
            block[:, slots - low] = coef
            lora_a, lora_bt, coef = self.lora_a[low:high], self.lora_bt[low:high], block
        else:
            index = slots.to(self.lora_a.device)
            lora_a, lora_bt = self.lora_a.index_select(0, index), self.lora_bt.index_select(0, index)
        rank = lora_a.shape[1]
        coef = coef.repeat_interleave(rank, dim=1).unsqueeze(1).to(self.weight.device, self.weight.dtype)
        return lora_a.reshape(-1, self.in_features), lora_bt.reshape(-1, self.out_features), coef

    def reference_delta(self, x: torch.Tensor) -> torch.Tensor:
        """The same deltas by a loop per row and per adapter: Σ weight · scaling · B (A x). x: [rows, seq, in]."""
        delta = torch.zeros(*x.shape[:-1], self.out_features, dtype=x.dtype, device=x.device)
        for row, route in enumerate(self.routing.routes):
            for slot, weight in route:
                rank = self.ranks[slot] if slot < len(self.ranks) else 0
                if rank == 0:
                    continue
                lora_a, lora_b = self.lora_a[slot, :rank], self.lora_bt[slot, :rank].t()
                scaling = float(self.scaling[slot]) * weight
                delta[row] += scaling * F.linear(F.linear(x[row], lora_a), lora_b)
        return delta

    def extra_repr(self) -> str:
        shape = None if self.lora_a is None else list(self.lora_a.shape)
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"slots x r_max x in={shape}")
