"""Low-rank factorization of weight changes: ΔW ≈ B·A by truncated SVD.

    ΔW = U·S·Vᵀ   ->   B = U_r·√S_r  [out, r],   A = √S_r·V_rᵀ  [r, in]     (scaling 1: alpha = r)

By Eckart–Young the rank-r truncation is the best rank-r approximation in Frobenius norm, with
    energy kept   = Σ_{i≤r} s_i² / Σ_i s_i²
    relative error = ‖ΔW − B·A‖_F / ‖ΔW‖_F = √(1 − energy kept).

A dense ΔW (extraction) is decomposed in float64 by `torch.linalg.svd`, or, when both sides exceed
`RANDOMIZED_ABOVE` and a rank is given, by randomized SVD (Halko, Martinsson & Tropp 2011) with
oversampling and power iterations; its achieved error is then computed exactly from the projection
(‖ΔW‖² − Σ s_i², the residual being orthogonal to the subspace found), not estimated.
A product B·A (resize, combine) is decomposed without forming it: QR of B and of Aᵀ, then the SVD of
the small k×k core, which is exact and costs O((out + in)·k²).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

RANDOMIZED_ABOVE = 4096
OVERSAMPLE = 16
POWER_ITERATIONS = 4


@dataclass
class Factored:
    """A truncated factorization of one layer's ΔW.

    Attributes:
        lora_a: [r, in] float32.  lora_b: [out, r] float32.  B·A approximates ΔW with scaling 1.
        energy: fraction of ‖ΔW‖²_F kept.  rel_error: ‖ΔW − B·A‖_F / ‖ΔW‖_F.
    """

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    energy: float
    rel_error: float

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]


def choose_rank(singular: torch.Tensor, total_energy: float, rank: int | None, energy: float | None) -> int:
    """The rank to keep: `rank` (capped by what exists), or the smallest reaching `energy` of the total."""
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank and energy")
    available = int((singular > 0).sum())
    if rank is not None:
        if rank < 1:
            raise ValueError(f"rank must be at least 1, found {rank}")
        return max(1, min(rank, available))
    if not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], found {energy}")
    kept = torch.cumsum(singular.double() ** 2, 0) / total_energy
    return max(1, min(int((kept < energy - 1e-12).sum()) + 1, available))


def _split(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int, total: float) -> Factored:
    root = s[:rank].sqrt()
    kept = float((s[:rank] ** 2).sum() / total) if total > 0 else 1.0
    kept = min(kept, 1.0)
    return Factored(
        lora_a=(root[:, None] * vh[:rank]).float(),
        lora_b=(u[:, :rank] * root[None, :]).float(),
        energy=kept,
        rel_error=max(0.0, 1.0 - kept) ** 0.5,
    )


def factor_dense(delta: torch.Tensor, rank: int | None = None, energy: float | None = None) -> Factored:
    """Truncated SVD of ΔW [out, in] (float64 arithmetic)."""
    matrix = delta.detach().double()
    total = float((matrix**2).sum())
    if total == 0:
        raise ValueError("ΔW is zero: nothing to factor")
    if rank is not None and min(matrix.shape) > RANDOMIZED_ABOVE and rank + OVERSAMPLE < min(matrix.shape):
        u, s, v = torch.svd_lowrank(matrix, q=rank + OVERSAMPLE, niter=POWER_ITERATIONS)
        return _split(u, s, v.T, choose_rank(s, total, rank, None), total)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return _split(u, s, vh, choose_rank(s, total, rank, energy), total)


def factor_product(
    lora_b: torch.Tensor, lora_a: torch.Tensor, rank: int | None = None, energy: float | None = None
) -> Factored:
    """Truncated SVD of B·A (B [out, k], A [k, in]) without forming the [out, in] product."""
    q_b, r_b = torch.linalg.qr(lora_b.detach().double())
    q_a, r_a = torch.linalg.qr(lora_a.detach().double().T)
    u_core, s, vh_core = torch.linalg.svd(r_b @ r_a.T)
    total = float((s**2).sum())
    if total == 0:
        raise ValueError("B·A is zero: nothing to factor")
    return _split(q_b @ u_core, s, vh_core @ q_a.T, choose_rank(s, total, rank, energy), total)


def pad_rank(factored: Factored, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) zero-padded to `rank` rows/columns: the same product, a uniform rank for every layer."""
    extra = rank - factored.rank
    lora_a = torch.cat([factored.lora_a, factored.lora_a.new_zeros(extra, factored.lora_a.shape[1])])
    lora_b = torch.cat([factored.lora_b, factored.lora_b.new_zeros(factored.lora_b.shape[0], extra)], dim=1)
    return lora_a, lora_b
