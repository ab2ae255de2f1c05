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

The norm is computed in float32 from W + s·(B·A) formed per layer, in the order PEFT forms it, and the
forward adds the same terms in the same order, so a float32 model computes PEFT's logits bit for bit
(norms from an algebraic shortcut that never forms the sum differ by an ulp, and 30 layers turn that into
1e-4 in the logits). Forming the sum costs about rank/(3·tokens) of the layer's training work; PEFT forms
B·A through an identity matrix, which costs in/rank times more.
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
    base = weight.dequantize(torch.float32) if isinstance(weight, NF4Weight) else weight.detach().float()
    return torch.linalg.norm(base + scaling * (lora_b.detach().float() @ lora_a.detach().float()), dim=1)


class DoRAOutput(torch.autograd.Function):
    """out = result + ((g − 1) ⊙ (result − b) + g ⊙ s·lora), PEFT's terms in its order, keeping only `out` and g
    for the backward pass.

    Autograd on the expression would keep the base output and the LoRA output of every DoRA layer (two
    [tokens, out] float32 tensors each: 1.3 GB for the bundled model at 4×256 tokens) for g's gradient.
    Since out = b + g ⊙ (W·x + s·B·A·x), that product is (out − b) / g, so the backward recomputes it from
    the output, which the next layer keeps anyway.

    Args (forward):
        result: [..., out] W·x + b.   lora_result: [..., out] B·(A·x).   gain: [out] float32.
        bias: [out] or None.   scaling: s.
    """

    @staticmethod
    def forward(ctx, result: torch.Tensor, lora_result: torch.Tensor, gain: torch.Tensor,
                bias: torch.Tensor | None, scaling: float) -> torch.Tensor:
        base_result = result if bias is None else result - bias
        out = (result + ((gain - 1) * base_result + gain * lora_result * scaling)).to(result.dtype)
        ctx.save_for_backward(out, gain, bias)
        ctx.scaling, ctx.dtypes = scaling, (result.dtype, lora_result.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        out, gain, bias = ctx.saved_tensors
        grad = grad_out.float()
        grad_result = (grad * gain).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        grad_lora = (grad * (gain * ctx.scaling)).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        grad_gain = grad_bias = None
        if ctx.needs_input_grad[2]:
            product = out.float() if bias is None else out.float() - bias.float()
            grad_gain = (grad * product.div_(gain)).reshape(-1, gain.shape[0]).sum(dim=0).to(gain.dtype)
        if ctx.needs_input_grad[3]:
            grad_bias = (grad * (1 - gain)).reshape(-1, gain.shape[0]).sum(dim=0).to(bias.dtype)
        return grad_result, grad_lora, grad_gain, grad_bias, None


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
