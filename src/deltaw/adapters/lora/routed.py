"""A linear layer that adds a different LoRA adapter to every row of a batch (multi-tenant serving).

Every adapter the bank holds lives in one slot of three stacked, zero-padded buffers per layer:

    lora_a   [slots, r_max, in]     A of the adapter in each slot, rows past its rank are zero
    lora_bt  [slots, r_max, out]    Bᵀ (B is [out, r]), rows past its rank are zero
    scaling  [slots]                alpha/r (or alpha/√r), 0 where the slot's adapter skips this layer

(B is stored transposed so that a run of slots is one contiguous block of both buffers: the stacks
below are views, not copies.)

A batch's `Routing` (shared by every layer, computed once per batch composition, not per layer)
says which rows use which slots with which weight: 1 for a row's adapter, w_i for each adapter of a
weighted mix; a row with no entry is the base model. Each layer then adds every row's delta in one
batched computation, never a loop over adapters:

  one adapter in the batch, or a few (groups · r_max <= DENSE_MAX_RANK): two matmuls over the batch's
  slots' A and Bᵀ stacked along the rank (one slot: just its own), each row's coefficients zeroing the
  ranks of the adapters it does not use (rows with other weights or the base get 0):
    x [rows, seq, in] ─► A_cat [groups·r_max, in] ─► ax [rows, seq, groups·r_max] ─► · coef [rows, 1, groups·r_max]
      ─► s·Bt_cat [groups·r_max, out] ─► (+ y)
  (a row does the multiply-adds of every adapter in the batch, but as two large GEMMs instead of many
  small ones: measured on the bundled model, decoding 8 rows over 4 adapters ran at 0.63x the one-adapter
  throughput with the grouped path below and at 0.96x with this one, `bench/serve.py`). Each layer keeps
  the stacked factors of its last FACTOR_CACHE slot groups, with every slot's scaling folded into Bᵀ (and,
  for bf16 on a CPU, both prepacked for oneDNN), until one of those slots is written; the coefficients
  depend on the routing only and are computed once for all layers. So rows joining and leaving a batch
  over the same adapters cost no per-layer work: restacking and repacking on every routing change took
  ~0.4 ms a layer, 90 ms a step on the bundled model. On a bf16 CPU, layers that read the same input (q/k/v,
  gate/up) run these two matmuls, and their base products, as one group (`routed_group.py`); above THIN_ROWS
  rows (prefill) Bᵀ is accumulated by addmm_ instead of a prepacked product.

  many adapters: rows are grouped by slot, each group padded to the largest (padding rows carry
  coefficient 0), one batched matmul per factor over all groups (segmented LoRA, as in S-LoRA/Punica):
    x ─► gather rows ─► xg [groups, g·seq, in] ─bmm─ A_block [groups, r_max, in]ᵀ ─► · coef [groups, g, 1, 1]
      ─bmm─ Bt_block [groups, r_max, out] ─► scatter-add into y rows

so row i gets y_i = W x_i + b + Σ_j w_ij · scaling_j · B_j (A_j x_i): its adapter, the exact weighted
sum of a mix's adapters (a mixed row sits in several groups), or nothing. Padding ranks, padding rows
and zero weights add exact zeros. Each adapter's weights are read once per step and each row does
the multiply-adds of its own adapters only. The layer keeps `weight` and `bias` under nn.Linear's
names (it *is* an nn.Linear), so what finds a model's linear layers (adapter validation,
fingerprints) sees the same model.

DoRA (`dora.py`) computes g ⊙ (W x + s·B A x) + b with a gain g = m / ‖W + s·B·A‖_row [out] that is fixed
once the adapter is loaded (W is frozen): its slot holds B' = g ⊙ B, and the gain's excess g − 1 sits in

    gain_shift  [slots, out]        g − 1 for a DoRA adapter, 0 otherwise (allocated with the first DoRA slot)

so row i computes G_i ⊙ (W x_i) + b + (the deltas above, with B'), G_i = 1 + Σ_j w_ij (g_j − 1). With one
adapter of weight 1 that is DoRA's output; a weighted mix is the weighted sum of the members' weight
changes Σ_j w_ij (W'_j − W), as for LoRA, so DoRA adapters mix (with each other and with LoRA) exactly.
Rows without a DoRA adapter have G = 1, and a batch without one skips the gain entirely.

`reference_delta` computes the same thing with a Python loop per row and per adapter and the plain LoRA
math (and the gain's excess); tests hold the batched paths to it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from deltaw.adapters.kinds import Route
from deltaw.adapters.lora.routed_group import SiblingGroup, add_delta
from deltaw.quant.nf4 import NF4Weight
from deltaw.quant.linear import linear_nf4
from deltaw.quant.packed import linear_packed, pack, packable

DENSE_MAX_RANK = 256  # the dense path up to this stacked rank (e.g. 16 adapters of r=16), grouped beyond
FACTOR_CACHE = 4  # slot groups whose stacked (and prepacked) factors a layer keeps


@dataclass
class _Factors:
    """A slot group's stacked factors in one layer: A [groups·r_max, in] and Bᵀ [groups·r_max, out] with each
    slot's scaling folded in, and (made on first use) both prepacked for oneDNN."""

    lora_a: torch.Tensor
    lora_bt: torch.Tensor
    _packed: tuple[torch.Tensor, torch.Tensor] | None = None

    def packed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) in oneDNN's blocked layout, for `linear_packed`."""
        if self._packed is None:
            self._packed = (pack(self.lora_a), pack(self.lora_bt.t()))
        return self._packed



@dataclass
class Routing:
    """The current batch's adapter assignment, read by every RoutedLinear.

    Attributes:
        routes: one Route per batch row.
        slots: [u] the distinct slots the batch uses, ascending (int64); None when every row is the base.
        row_weights: [rows] each row's weight when u == 1 (0 for base rows), else None.
        group_slots: [groups] the slot of each group: the run low..high-1 covering `slots` when that run is
            at most twice as long (a view of the buffers), else `slots` themselves (one group when u == 1).
        block: (low, high) when the groups are that run of slots, else None (gathered).
        group_rows: [groups · g] the batch row of each group member (padding: row 0).
        group_weights: [groups, g] each member's weight (padding and unused slots: 0).
        row_group_weights: [rows, groups] each row's weight for each group's slot (0: not used by the row).
        group_key: the group slots as a tuple (what a layer's cached factors are keyed by).
        version: bumped whenever routes or slot contents change; layers rebuild their stacks on change.
        reference: compute with the slow per-row loop (for tests) instead of the batched path.
    """

    routes: list[Route] = field(default_factory=list)
    slots: torch.Tensor | None = None
    row_weights: torch.Tensor | None = None
    group_slots: torch.Tensor | None = None
    block: tuple[int, int] | None = None
    group_rows: torch.Tensor | None = None
    group_weights: torch.Tensor | None = None
    row_group_weights: torch.Tensor | None = None
    group_key: tuple[int, ...] = ()
    version: int = 0
    reference: bool = False
    _coefs: dict = field(default_factory=dict, repr=False)

    def set(self, routes: list[Route]) -> None:
        """Route row i of the next forward passes to `routes[i]` (a no-op when nothing changed)."""
        routes = [tuple(route) for route in routes]
        if routes == self.routes:
            return
        self.routes = routes
        distinct = sorted({slot for route in routes for slot, _ in route})
        self.slots = torch.tensor(distinct, dtype=torch.long) if distinct else None
        self.row_weights = self.group_slots = self.block = self.group_rows = self.group_weights = None
        self.row_group_weights, self.group_key, self._coefs = None, (), {}
        if distinct:
            self._group(routes, distinct)
        if len(distinct) == 1:
            self.row_weights = self.row_group_weights[:, 0]
        self.version += 1

    def dense_coef(self, rank: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """[rows, 1, groups·rank]: each row's weight for every rank of every group's slot (the dense path's
        coefficients; a layer's scaling is in its factors). Computed once per routing, shared by all layers."""
        key = (rank, dtype, device)
        if key not in self._coefs:
            self._coefs[key] = self.row_group_weights.repeat_interleave(rank, dim=1)[:, None, :].to(device, dtype)
        return self._coefs[key]

    def _group(self, routes: list[Route], distinct: list[int]) -> None:
        low, high = distinct[0], distinct[-1] + 1
        self.block = (low, high) if high - low <= 2 * len(distinct) else None
        group_slots = list(range(low, high)) if self.block else distinct
        members: dict[int, list[tuple[int, float]]] = {slot: [] for slot in group_slots}
        for row, route in enumerate(routes):
            for slot, weight in route:
                members[slot].append((row, weight))
        size = max(len(group) for group in members.values())
        self.group_rows = torch.zeros(len(group_slots), size, dtype=torch.long)
        self.group_weights = torch.zeros(len(group_slots), size)
        for index, slot in enumerate(group_slots):
            for member, (row, weight) in enumerate(members[slot]):
                self.group_rows[index, member], self.group_weights[index, member] = row, weight
        self.group_rows = self.group_rows.reshape(-1)
        self.group_slots = torch.tensor(group_slots, dtype=torch.long)
        self.group_key = tuple(group_slots)
        self.row_group_weights = torch.zeros(len(routes), len(group_slots))
        position = {slot: index for index, slot in enumerate(group_slots)}
        for row, route in enumerate(routes):
            for slot, weight in route:
                self.row_group_weights[row, position[slot]] += weight

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
        scaling: [slots] float32, on the CPU.
        ranks: the rank stored in each slot (0: the slot's adapter does not target this layer).
        gain_shift: [slots, out] DoRA's g − 1 per slot (0 for LoRA), or None before the first DoRA adapter.
    """

    def __init__(self, base: nn.Linear, routing: Routing) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.routing = routing
        self.register_buffer("lora_a", None, persistent=False)
        self.register_buffer("lora_bt", None, persistent=False)
        self.register_buffer("gain_shift", None, persistent=False)
        self.scaling: torch.Tensor | None = None  # [slots] float32 on the CPU: routing metadata, not moved by .to()
        self.ranks: list[int] = []
        self._plan: tuple[int, tuple | None, torch.Tensor | None] | None = None  # (routing version, plan, gain)
        self._packed: tuple[int, int, torch.Tensor] | None = None  # (weight's data_ptr, _version, packed weight)
        self.group: SiblingGroup | None = None  # the layers read the same input with, computed together
        self._factors: OrderedDict[tuple[int, ...], _Factors | None] = OrderedDict()  # slot group -> factors

    def _apply(self, fn, *args, **kwargs):  # .to(), .cuda(), ...: the caches hold tensors of the old placement
        self._plan, self._packed = None, None
        self._factors.clear()
        if self.group is not None:
            self.group.release()
        return super()._apply(fn, *args, **kwargs)

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
        scaling = torch.zeros(slots, dtype=torch.float32)
        if self.lora_a is not None:
            lora_a[:old_slots, :old_rank] = self.lora_a
            lora_bt[:old_slots, :old_rank] = self.lora_bt
            scaling[:old_slots] = self.scaling
        if self.gain_shift is not None:
            gain_shift = torch.zeros(slots, self.out_features, device=self.weight.device)
            gain_shift[:old_slots] = self.gain_shift
            self.gain_shift = gain_shift
        self.lora_a, self.lora_bt, self.scaling = lora_a, lora_bt, scaling
        self.ranks += [0] * (slots - len(self.ranks))
        self._factors.clear()

    @torch.no_grad()
    def write_slot(self, slot: int, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                   gain: torch.Tensor | None = None) -> None:
        """Store A [r, in] and B [out, r] in `slot`, zero-padded to r_max; a DoRA adapter also gives its gain
        g [out] (B is stored as g ⊙ B, and g − 1 in gain_shift)."""
        rank = lora_a.shape[0]
        self.reserve(slot + 1, rank)
        self.lora_a[slot].zero_()
        self.lora_bt[slot].zero_()
        self.lora_a[slot, :rank] = lora_a
        self.lora_bt[slot, :rank] = lora_b.t() if gain is None else (lora_b.float() * gain.float()[:, None]).t()
        if gain is not None and self.gain_shift is None:  # float32: g is close to 1
            self.gain_shift = torch.zeros(self.lora_a.shape[0], self.out_features, device=self.weight.device)
        if self.gain_shift is not None:
            self.gain_shift[slot] = 0.0 if gain is None else gain - 1.0
        self.scaling[slot] = scaling
        self.ranks[slot] = rank
        self._factors.clear()

    @torch.no_grad()
    def clear_slot(self, slot: int) -> None:
        """Zero `slot` (its adapter does not target this layer)."""
        if self.lora_a is not None and slot < self.lora_a.shape[0]:
            self.lora_a[slot].zero_()
            self.lora_bt[slot].zero_()
            self.scaling[slot] = 0.0
            self.ranks[slot] = 0
            if self.gain_shift is not None:
                self.gain_shift[slot] = 0.0
            self._factors.clear()

    # ----------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [rows, seq, in] -> [rows, seq, out], row i with the adapters of `routing.routes[i]`."""
        routing = self.routing
        if self.group is not None and not routing.reference:
            output = self.group.forward(self, x)  # computed with its siblings (same input), or None: alone
            if output is not None:
                return output
        if routing.slots is None or self.lora_a is None:
            return self._base(x, self.bias)
        if routing.reference:
            return self._base(x, self.bias) + self.reference_delta(x)
        plan, gain = self.current_plan()
        if gain is None:
            y = self._base(x, self.bias)
        else:  # DoRA rows: G ⊙ (W x) + b
            y = self._base(x, None).mul_(gain)
            if self.bias is not None:
                y += self.bias
        if plan is None:
            return y
        if isinstance(plan[0], _Factors):  # one adapter in the batch, or a few stacked along the rank
            factors, coef = plan
            packed = factors.packed if packable(factors.lora_a, x) else None  # bf16 CPU serving
            return add_delta(y, x, factors.lora_a, [((0, self.out_features, 0, len(factors.lora_a)), factors.lora_bt)],
                             coef, packed)
        lora_a, lora_bt, coef, rows = plan
        groups, size = coef.shape[:2]
        grouped = x.index_select(0, rows).view(groups, -1, self.in_features)  # [groups, g·seq, in]
        ax = torch.bmm(grouped, lora_a.transpose(1, 2))  # [groups, g·seq, r_max]
        ax.view(groups, size, -1, ax.shape[-1]).mul_(coef)
        delta = torch.bmm(ax, lora_bt)  # [groups, g·seq, out]
        return y.index_add_(0, rows, delta.view(groups * size, *y.shape[1:]))

    def current_plan(self) -> tuple[tuple | None, torch.Tensor | None]:
        """(plan, gain) for the current routing (see `_build_plan`, `_build_gain`); (None, None) for the base."""
        routing = self.routing
        if routing.slots is None or self.lora_a is None:
            return None, None
        if self._plan is None or self._plan[0] != routing.version:
            self._plan = (routing.version, self._build_plan(), self._build_gain())
        return self._plan[1], self._plan[2]

    def _base(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """W x (+ bias); an NF4 base (QLoRA) is dequantized on the fly; a bf16 CPU base is read prepacked for
        oneDNN when serving (quant/packed.py: same results, packed again if the weight changes)."""
        if isinstance(self.weight, NF4Weight):
            return linear_nf4(x, self.weight, bias)
        if not packable(self.weight, x):
            return F.linear(x, self.weight, bias)
        key = (self.weight.data_ptr(), self.weight._version)
        if self._packed is None or self._packed[:2] != key:
            self._packed = (*key, pack(self.weight))
        return linear_packed(x, self._packed[2], bias)

    def _build_gain(self) -> torch.Tensor | None:
        """G [rows, 1, out] = 1 + Σ_j w_ij (g_j − 1) for the current routing, or None when no row's adapter is
        a DoRA adapter of this layer."""
        routing, shift = self.routing, self.gain_shift
        if shift is None:
            return None
        if routing.row_weights is not None:
            slot_shift = shift[int(routing.slots[0])]
            if not slot_shift.any():
                return None
            gain = routing.row_weights.to(shift.device)[:, None] * slot_shift[None, :]
        else:
            slots = routing.group_slots.to(shift.device)
            group_shift = shift.index_select(0, slots)
            if not group_shift.any():
                return None
            gain = routing.row_group_weights.to(shift.device) @ group_shift
        return gain.add_(1.0).unsqueeze(1)

    def _build_plan(self) -> tuple | None:
        """For the current routing: (factors, coef [rows, 1, groups·r_max]) with one adapter or a few (the
        factors of the batch's slots, stacked along the rank, from the layer's cache); (A [groups, r_max, in],
        Bt [groups, r_max, out], coef [groups, g, 1, 1], rows [groups·g]) with many; None when no adapter of the
        batch touches this layer."""
        routing = self.routing  # the bank keeps every layer with buffers at its full slot capacity
        dtype, device = self.weight.dtype, self.weight.device
        slots, rank = routing.group_slots, self.lora_a.shape[1]
        if len(slots) == 1 or len(slots) * rank <= DENSE_MAX_RANK:
            factors = self._dense_factors(routing)
            return None if factors is None else (factors, routing.dense_coef(rank, dtype, device))
        scaling = self.scaling[slots]
        if not scaling.any():
            return None
        index = slots.to(device)
        lora_a, lora_bt = self.lora_a.index_select(0, index), self.lora_bt.index_select(0, index)
        coef = (routing.group_weights * scaling[:, None]).view(*routing.group_weights.shape, 1, 1)
        return lora_a, lora_bt, coef.to(device, dtype), routing.group_rows.to(device)

    def _dense_factors(self, routing: Routing) -> _Factors | None:
        """The stacked factors of the routing's group slots (None when none of them targets this layer), from
        the cache of the last FACTOR_CACHE slot groups: a batch whose rows come and go over the same adapters
        keeps reading the same (prepacked) factors."""
        key = routing.group_key
        if key in self._factors:
            self._factors.move_to_end(key)
            return self._factors[key]
        scaling = self.scaling[routing.group_slots]
        if not scaling.any():
            factors = None
        else:
            if routing.block is not None:
                low, high = routing.block
                lora_a, lora_bt = self.lora_a[low:high], self.lora_bt[low:high]
            else:
                index = routing.group_slots.to(self.weight.device)
                lora_a, lora_bt = self.lora_a.index_select(0, index), self.lora_bt.index_select(0, index)
            groups, rank = lora_a.shape[:2]
            scaled = lora_bt.float() * scaling.to(lora_bt.device)[:, None, None]  # one rounding below
            factors = _Factors(lora_a.reshape(groups * rank, -1),
                               scaled.reshape(groups * rank, -1).to(lora_bt.dtype))
        self._factors[key] = factors
        if len(self._factors) > FACTOR_CACHE:
            self._factors.popitem(last=False)
        return factors

    def reference_delta(self, x: torch.Tensor) -> torch.Tensor:
        """The same deltas by a loop per row and per adapter: Σ weight · (scaling · B' (A x) + (g − 1) ⊙ W x),
        B' = g ⊙ B as stored (g = 1 for LoRA). x: [rows, seq, in]."""
        delta = torch.zeros(*x.shape[:-1], self.out_features, dtype=x.dtype, device=x.device)
        for row, route in enumerate(self.routing.routes):
            for slot, weight in route:
                rank = self.ranks[slot] if slot < len(self.ranks) else 0
                if rank == 0:
                    continue
                lora_a, lora_b = self.lora_a[slot, :rank], self.lora_bt[slot, :rank].t()
                scaling = float(self.scaling[slot]) * weight
                delta[row] += scaling * F.linear(F.linear(x[row], lora_a), lora_b)
                if self.gain_shift is not None:
                    delta[row] += (weight * self.gain_shift[slot] * self._base(x[row], None)).to(x.dtype)
        return delta

    def extra_repr(self) -> str:
        shape = None if self.lora_a is None else list(self.lora_a.shape)
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"slots x r_max x in={shape}")
