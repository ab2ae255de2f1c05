"""RMSNorm for training as one autograd node: fewer passes over the hidden states, no float32 copy saved.

Llama's RMSNorm (Qwen2/3's and Mistral's are the same code) is y = w ⊙ round(x̂), x̂ = x·rstd, rstd =
1/sqrt(mean(x²) + eps), computed in float32 and rounded to x's dtype. Through plain autograd it saves a
float32 copy of x, x̂ and its rounding for backward, and the backward takes about ten passes over
[tokens, hidden]. `RMSNormFunction` computes the same forward, saves only x (which the residual stream
keeps anyway) and rstd [tokens, 1], and takes the gradient in float32 in place:

    g̃ = g ⊙ w   dx = rstd · (g̃ − x̂ · mean(g̃ ⊙ x̂))   (dw = Σ_rows g ⊙ round(x̂), if w is trained)

The forward is bit-identical; the gradient differs from plain autograd's only in that g ⊙ w is not rounded
to bf16 before the float32 arithmetic (it is more exact, within one bf16 rounding). `fuse_norms(model)`
switches a model's RMSNorm layers of those classes (`FUSED_CLASSES`) to it; the others are left as they
are. The layers keep their class, parameters and state-dict keys; only `forward` changes.
"""

from __future__ import annotations

import types

import torch
from torch import nn

FUSED_CLASSES = frozenset({"LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm"})
"""transformers RMSNorm classes whose forward is w ⊙ round(x·rstd) (Gemma's (1 + w) form is not one)."""


class RMSNormFunction(torch.autograd.Function):
    """x [..., hidden], w [hidden] -> w ⊙ round(x·rstd) [..., hidden] (see the module doc)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        values = x.to(torch.float32, copy=True)  # a copy even in fp32: it is scaled in place
        rstd = torch.rsqrt(values.square().mean(-1, keepdim=True).add_(eps))  # [..., 1]
        ctx.save_for_backward(x, weight, rstd)
        return weight * values.mul_(rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        normed = x.to(torch.float32, copy=True).mul_(rstd)  # x̂
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * normed.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        scaled = grad.to(torch.float32, copy=True).mul_(weight)  # g̃
        dot = (scaled * normed).mean(-1, keepdim=True)
        grad_x = scaled.sub_(normed.mul_(dot)).mul_(rstd).to(x.dtype)
        return grad_x, grad_weight, None


def _fused_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)


def fuse_norms(model: nn.Module) -> int:
    """Run every RMSNorm of `model` whose class is in FUSED_CLASSES through RMSNormFunction; returns how many."""
    count = 0
    for module in model.modules():
        if type(module).__name__ in FUSED_CLASSES and "forward" not in vars(module):
            module.forward = types.MethodType(_fused_forward, module)
            count += 1
    return count
