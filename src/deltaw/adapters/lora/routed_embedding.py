"""An embedding that adds a different LoRA adapter to every row of a batch (serving), routed like RoutedLinear.

Each resident adapter that adapts the embedding holds one slot of

    lora_at   [slots, vocab, r_max]   Aᵀ (A is [r, vocab]), so a token's column is one gathered row
    lora_bt   [slots, r_max, dim]     Bᵀ (B is [dim, r])
    scaling   [slots]                 0 where the slot's adapter leaves the embedding alone

and row i gets e_i(t) = E[t] + Σ_j w_ij · scaling_j · B_j A_j[:, t] (times the embedding's output scale, as
the base). Trainable token rows are written here as an embedding LoRA of rank n: A = one-hot(indices)
[n, vocab], B = (V − E[indices])ᵀ, scaling 1, so e(indices[j]) = V[j] and every other row is untouched,
and a weighted mix is again the weighted sum of the members' changes. The embedding is one layer, so the
forward loops over the distinct slots of the batch (a handful), each one gather and one batched matmul;
`reference_delta` is the plain per-row loop tests hold it to.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deltaw.adapters.lora.routed import Routing


class RoutedEmbedding(nn.Embedding):
    """nn.Embedding plus per-row LoRA deltas from stacked adapter slots (see the module docstring).

    Attributes:
        weight: [vocab, dim], the base embedding (the original Parameter: a tied head keeps sharing it).
        lora_at: [slots, vocab, r_max] or None before an adapter adapts the embedding.
        lora_bt: [slots, r_max, dim] or None.
        scaling: [slots] float32 on the CPU.
        ranks: the rank stored in each slot (0: the slot's adapter leaves the embedding alone).
    """

    def __init__(self, base: nn.Embedding, routing: Routing) -> None:
        nn.Module.__init__(self)
        for attribute in ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                          "scale_grad_by_freq", "sparse"):
            setattr(self, attribute, getattr(base, attribute))
        self.weight = base.weight
        self.__dict__["base_layer"] = base  # its output scale (Gemma 3); not a submodule
        self.routing = routing
        self.register_buffer("lora_at", None, persistent=False)
        self.register_buffer("lora_bt", None, persistent=False)
        self.scaling: torch.Tensor | None = None
        self.ranks: list[int] = []
        self._coefficients: tuple[int, dict[int, torch.Tensor]] | None = None

    # ----------------------------------------------------------------------------- slots
    def reserve(self, slots: int, rank: int) -> None:
        """Grow the buffers (zero-padded, contents kept) to at least `slots` slots of rank `rank`."""
        old_slots, old_rank = (0, 0) if self.lora_at is None else (self.lora_at.shape[0], self.lora_at.shape[2])
        if slots <= old_slots and rank <= old_rank:
            return
        slots, rank = max(slots, old_slots), max(rank, old_rank)
        like = {"dtype": self.weight.dtype, "device": self.weight.device}
        lora_at = torch.zeros(slots, self.num_embeddings, rank, **like)
        lora_bt = torch.zeros(slots, rank, self.embedding_dim, **like)
        scaling = torch.zeros(slots, dtype=torch.float32)
        if self.lora_at is not None:
            lora_at[:old_slots, :, :old_rank] = self.lora_at
            lora_bt[:old_slots, :old_rank] = self.lora_bt
            scaling[:old_slots] = self.scaling
        self.lora_at, self.lora_bt, self.scaling = lora_at, lora_bt, scaling
        self.ranks += [0] * (slots - len(self.ranks))

    @torch.no_grad()
    def write_slot(self, slot: int, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> None:
        """Store A [r, vocab] and B [dim, r] in `slot`, zero-padded to r_max."""
        rank = lora_a.shape[0]
        self.reserve(slot + 1, rank)
        self.lora_at[slot].zero_()
        self.lora_bt[slot].zero_()
        self.lora_at[slot, :, :rank] = lora_a.t()
        self.lora_bt[slot, :rank] = lora_b.t()
        self.scaling[slot], self.ranks[slot] = scaling, rank

    @torch.no_grad()
    def clear_slot(self, slot: int) -> None:
        """Zero `slot` (its adapter leaves the embedding alone)."""
        if self.lora_at is not None and slot < self.lora_at.shape[0]:
            self.lora_at[slot].zero_()
            self.lora_bt[slot].zero_()
            self.scaling[slot], self.ranks[slot] = 0.0, 0

    # ----------------------------------------------------------------------------- forward
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: [rows, seq] -> [rows, seq, dim], row i with the adapters of `routing.routes[i]`."""
        y = F.embedding(ids, self.weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq,
                        self.sparse)
        routing = self.routing
        if routing.slots is not None and self.lora_at is not None:
            y = y + (self.reference_delta(ids) if routing.reference else self._delta(ids))
        return self._scaled(y)

    def _delta(self, ids: torch.Tensor) -> torch.Tensor:
        """Σ over the batch's slots of coefficient[row] · Aᵀ[ids] Bᵀ: [rows, seq, dim]."""
        delta = torch.zeros(*ids.shape, self.embedding_dim, dtype=self.weight.dtype, device=ids.device)
        for slot, coefficient in self._slot_coefficients().items():
            after_a = self.lora_at[slot][ids]  # [rows, seq, r_max]
            delta.baddbmm_(after_a * coefficient.view(-1, 1, 1), self.lora_bt[slot].expand(ids.shape[0], -1, -1))
        return delta

    def _slot_coefficients(self) -> dict[int, torch.Tensor]:
        """slot -> [rows] weight · scaling of that slot in each row, for the slots of the routing that adapt the
        embedding (computed once per routing version)."""
        routing = self.routing
        if self._coefficients is None or self._coefficients[0] != routing.version:
            rows: dict[int, list[float]] = {}
            for row, route in enumerate(routing.routes):
                for slot, weight in route:
                    if slot < len(self.ranks) and self.ranks[slot]:
                        rows.setdefault(slot, [0.0] * len(routing.routes))[row] += weight * float(self.scaling[slot])
            coefficients = {slot: torch.tensor(values, dtype=self.weight.dtype, device=self.weight.device)
                            for slot, values in rows.items()}
            self._coefficients = (routing.version, coefficients)
        return self._coefficients[1]

    def reference_delta(self, ids: torch.Tensor) -> torch.Tensor:
        """The same deltas by a loop per row and per adapter: Σ weight · scaling · B A[:, ids]."""
        delta = torch.zeros(*ids.shape, self.embedding_dim, dtype=self.weight.dtype, device=ids.device)
        for row, route in enumerate(self.routing.routes):
            for slot, weight in route:
                rank = self.ranks[slot] if slot < len(self.ranks) else 0
                if rank:
                    lora_a, lora_b = self.lora_at[slot, :, :rank].t(), self.lora_bt[slot, :rank].t()
                    delta[row] += weight * float(self.scaling[slot]) * (lora_b @ lora_a[:, ids[row]]).t()
        return delta

    def _scaled(self, y: torch.Tensor) -> torch.Tensor:
        scale = getattr(self.__dict__["base_layer"], "embed_scale", None)
        return y if scale is None else y * scale.to(device=y.device, dtype=self.weight.dtype)

    def extra_repr(self) -> str:
        shape = None if self.lora_at is None else list(self.lora_at.shape)
        return f"{self.num_embeddings}, {self.embedding_dim}, slots x vocab x r_max={shape}"
