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

The norm is computed in float32 from W + s·(B·A) formed per layer. For a float32 weight the sum is formed
in the order PEFT forms it, and the forward adds the same terms in the same order, so a float32 model
computes PEFT's logits bit for bit (norms from an algebraic shortcut that never forms the sum differ by an
ulp, and 30 layers turn that into 1e-4 in the logits). For a bf16 or NF4 weight (where PEFT's own sums are
in bf16) the sum is one fused multiply-add into the float32 copy of W. Forming it costs about
rank/(3·tokens) of the layer's training work; PEFT forms B·A through an identity matrix, which costs
in/rank times more.
"""

from __future__ import annotations

import torch

from deltaw.quant.nf4 import NF4Weight


@torch.no_grad()
def adapted_row_norms(weight: torch.Tensor | NF4Weight, lora_a: torch.Tensor, lora_b: torch.Tensor,
                      scaling: float) -> torch.Tensor:
    """‖W + s·B·A‖ per output row, float32 [out] (no gradient).

    Args:
        weight: [out, in] the frozen base weight, float or NF4 (dequantized to float32).
        lora_a: [r, in].  lora_b: [out, r].  scaling: s.
    """
    lora_a, lora_b = lora_a.detach().float(), lora_b.detach().float()
    if isinstance(weight, torch.Tensor) and weight.dtype == torch.float32:  # PEFT's sum, in PEFT's order
        return torch.linalg.norm(weight.detach() + scaling * (lora_b @ lora_a), dim=1)
    base = weight.dequantize(torch.float32) if isinstance(weight, NF4Weight) else weight.detach().float()
    return torch.linalg.norm(torch.addmm(base, lora_b, lora_a, alpha=scaling, out=base), dim=1)


class DoRAOutput(torch.autograd.Function):
    """out = result + ((g − 1) ⊙ (result − b) + g ⊙ s·lora) = b + g ⊙ (W·x + s·lora), keeping only `out` and g
    for the backward pass.

    Autograd on the expression would keep the base output and the LoRA output of every DoRA layer (two
    [tokens, out] float32 tensors each: 1.3 GB for the bundled model at 4×256 tokens) for g's gradient;
    here that gradient is Σ_tokens grad ⊙ (out − b) / g, from the output the next layer keeps anyway.
    In float32 the forward adds PEFT's terms in PEFT's order (its logits, bit for bit). In bf16, where
    PEFT's own sums round differently, it computes y + y ⊙ (g − 1) with y = W·x + s·lora, all in the
    activations' dtype: g − 1 is small, so its bf16 rounding moves g by ~1e-5, and no pass mixes dtypes
    (a bf16 × float32 product on the CPU is ten times slower than a bf16 one).

    Args (forward):
        result: [..., out] W·x + b.   lora_result: [..., out] B·(A·x).   gain: [out] float32.
        bias: [out] or None.   scaling: s.
    """

    @staticmethod
    def forward(ctx, result: torch.Tensor, lora_result: torch.Tensor, gain: torch.Tensor,
                bias: torch.Tensor | None, scaling: float) -> torch.Tensor:
        base_result = result if bias is None else result - bias
        if result.dtype == lora_result.dtype == torch.float32:
            out = result + ((gain - 1) * base_result + gain * lora_result * scaling)
        else:
            direction = torch.add(base_result, lora_result.to(result.dtype), alpha=scaling)
            out = torch.addcmul(direction, direction, (gain - 1).to(result.dtype))
            out = out if bias is None else out.add_(bias)
        ctx.save_for_backward(out, gain, bias)
        ctx.scaling, ctx.lora_dtype = scaling, lora_result.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        out, gain, bias = ctx.saved_tensors
        grad_result = torch.addcmul(grad_out, grad_out, (gain - 1).to(grad_out.dtype))  # d out / d result = g
        grad_lora = (grad_result * ctx.scaling).to(ctx.lora_dtype) if ctx.needs_input_grad[1] else None
        grad_gain = grad_bias = None
        rows = grad_out.reshape(-1, gain.shape[0])
        if ctx.needs_input_grad[2]:
            direction = out if bias is None else out - bias
            product = torch.sum(rows * direction.reshape(-1, gain.shape[0]), dim=0, dtype=torch.float32)
            grad_gain = (product / gain).to(gain.dtype)
        if ctx.needs_input_grad[3]:
            grad_bias = (torch.sum(rows, dim=0, dtype=torch.float32) * (1 - gain)).to(bias.dtype)
        return grad_result if ctx.needs_input_grad[0] else None, grad_lora, grad_gain, grad_bias, None


def dora_gain(magnitude: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """g = m / ‖W + s·B·A‖_row [out]; the norm carries no gradient, the magnitude does."""
    return magnitude / norms.to(magnitude.dtype)


@torch.no_grad()
def dora_weight(base: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                magnitude: torch.Tensor) -> torch.Tensor:
    """The merged weight m ⊙ (W + s·B·A) / ‖W + s·B·A‖_row, float32 [out, in]; `base` [out, in] is W."""
    direction = base.float() + (lora_b.float() @ lora_a.float()) * scaling
    return direction.mul_((magnitude.float() / torch.linalg.norm(direction, dim=1)).unsqueeze(1))


def initial_magnitude(weight: torch.Tensor | NF4Weight) -> torch.Tensor:
    """m for a fresh adapter (B = 0): ‖W‖_row, float32 [out], from the same computation as the forward's norm,
    so a fresh adapter's gain is exactly 1."""
    base = weight.dequantize(torch.float32) if isinstance(weight, NF4Weight) else weight.detach().float()
    return torch.linalg.norm(base, dim=1)


@torch.no_grad()
def frozen_gain(weight: torch.Tensor | NF4Weight, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                magnitude: torch.Tensor) -> torch.Tensor:
    """g = m / ‖W + s·B·A‖_row for a weight that no longer changes (serving): float32 [out]."""
    return magnitude.float() / adapted_row_norms(weight, lora_a, lora_b, scaling)
