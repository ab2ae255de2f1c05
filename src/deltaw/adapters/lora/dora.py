"""DoRA: a LoRA adapter whose update is split into a direction and a learned magnitude per output row.

    W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖_row        m [out], the norm per output row (over `in`)

    y = g ⊙ (W·x + s·B·(A·x)) + b,   g = m / ‖W + s·B·A‖_row  [out]   (detached: no gradient through the norm)

Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation" (2024). The conventions are PEFT's
(`peft/tuners/lora/dora.py`), so files and logits agree with it:

- the norm is taken per output row of W [out, in] (PEFT's `torch.linalg.norm(W + s·B·A, dim=1)`), and m is
  initialised to ‖W‖_row, so a fresh adapter (B = 0) computes the base layer;
- the norm is treated as a constant in the backward pass (section 4.3 of the paper), so m, A and B get
  their gradients through g's numerator and through B·A·x only;
- with dropout active in training, the adapter sees the dropped-out input x̃ and the base the full x:
  y = W·x + b + (g − 1) ⊙ W·x̃ + g ⊙ s·B·(A·x̃);
- on a QLoRA base the norm is that of the dequantized weight.

The norm is computed without forming W + s·B·A: with w_i the rows of W and b_i those of B,
    ‖w_i + s·A^T b_i‖² = ‖w_i‖² + 2s·(W·Aᵀ)_i·b_i + s²·b_i·(A·Aᵀ)·b_i
where ‖w_i‖² is computed once per layer (W is frozen) and W·Aᵀ [out, r] costs one pass over W: no
[out, in] temporary per step (PEFT forms B·A through an identity matrix and adds it to W every step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deltaw.quant.linear import linear_nf4
from deltaw.quant.nf4 import NF4Weight


def base_row_norms_sq(weight: torch.Tensor) -> torch.Tensor:
    """‖w_i‖² for every output row of a float weight [out, in] -> [out] float32."""
    return weight.detach().float().pow(2).sum(dim=1)


@torch.no_grad()
def adapted_row_norms(weight: torch.Tensor | NF4Weight, weight_sq: torch.Tensor, lora_a: torch.Tensor,
                      lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """‖W + s·B·A‖ per output row, float32 [out], without forming the sum (see the module docstring).

    Args:
        weight: [out, in] the frozen base weight, float or NF4.
        weight_sq: [out] ‖w_i‖² of that weight (base_row_norms_sq; float32).
        lora_a: [r, in].  lora_b: [out, r].  scaling: s.
    """
    lora_a32, lora_b32 = lora_a.detach().float(), lora_b.detach().float()
    if isinstance(weight, NF4Weight):
        w_at = linear_nf4(lora_a.detach().to(weight.dtype), weight).float().t()  # [out, r]
    else:
        w_at = F.linear(lora_a.detach().to(weight.dtype), weight.detach()).float().t()
    cross = (w_at * lora_b32).sum(dim=1)
    gram = lora_a32 @ lora_a32.t()  # [r, r]
    square = ((lora_b32 @ gram) * lora_b32).sum(dim=1)
    return (weight_sq + 2.0 * scaling * cross + scaling * scaling * square).clamp_min(0.0).sqrt()


def dora_gain(magnitude: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """g = m / ‖W + s·B·A‖_row [out]; the norm carries no gradient, the magnitude does."""
    return magnitude / norms.to(magnitude.dtype)


@torch.no_grad()
def dora_weight(base: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                magnitude: torch.Tensor) -> torch.Tensor:
    """The merged weight m ⊙ (W + s·B·A) / ‖W + s·B·A‖_row, float32 [out, in]; `base` [out, in] is W."""
    direction = torch.addmm(base.float(), lora_b.float(), lora_a.float(), alpha=scaling)
    return direction.mul_((magnitude.float() / direction.norm(dim=1)).unsqueeze(1))


def initial_magnitude(weight_sq: torch.Tensor) -> torch.Tensor:
    """m for a fresh adapter (B = 0): ‖W‖_row from `weight_sq` [out] (‖w_i‖²), float32 [out]. Taken from the
    same sums the forward pass uses, so a fresh adapter's gain is exactly 1."""
    return weight_sq.sqrt()


@torch.no_grad()
def frozen_gain(weight: torch.Tensor | NF4Weight, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                magnitude: torch.Tensor) -> torch.Tensor:
    """g = m / ‖W + s·B·A‖_row for a weight that no longer changes (serving): float32 [out]."""
    base = weight.dequantize(torch.float32) if isinstance(weight, NF4Weight) else weight
    return magnitude.float() / adapted_row_norms(weight, base_row_norms_sq(base), lora_a, lora_b, scaling)
