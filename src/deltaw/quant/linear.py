"""The frozen 4-bit linear layer of QLoRA: y = x·dequantize(W)ᵀ + b, with W stored as NF4.

    forward:   W̃ = dequantize(W_nf4)  (block-wise, into the compute dtype)   y = x·W̃ᵀ + b   W̃ freed
    backward:  W̃ = dequantize(W_nf4)  again                                 dx = dy·W̃

The autograd function keeps a reference to the packed weight, never a dequantized copy, so between
steps (and between forward and backward) a quantized layer holds 4.127 bits per parameter; the float
weight exists only while its own matmul runs. W gets no gradient: it is frozen by construction.
On CUDA with Triton available, dequantization runs as one fused kernel (deltaw.quant.triton).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from deltaw.quant.nf4 import NF4Weight, quantize


class _Workspace(threading.local):
    """Per-thread buffers for dequantization, grown to the largest layer and reused by every layer.

    A dequantized weight lives only during its own matmul (it is never saved for backward), so one
    buffer serves all layers. Reusing it keeps the allocator from interleaving megabyte-sized
    temporaries with activations, which fragments the heap: measured on the bundled model (bf16,
    4x256), this took QLoRA's peak memory from 60 MiB above LoRA's to below it.
    """

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}

    def get(self, role: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (role, dtype, device)
        buffer = self.buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = self.buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel]


_workspace = _Workspace()


def dequantize_for(weight: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    """The weight [out, in] in `dtype`, valid until the calling thread's next call (a shared workspace)."""
    if weight.device.type == "cuda":
        from deltaw.quant.triton import dequantize_cuda, triton_available

        if triton_available():
            return dequantize_cuda(weight, dtype)
    count, device = weight.packed.numel(), weight.device
    scratch = (_workspace.get("indices", count, torch.int32, device),
               _workspace.get("values", 2 * count, torch.float32, device))
    out = scratch[1][: weight.numel()] if dtype == torch.float32 else _workspace.get("weight", weight.numel(), dtype, device)
    return weight.dequantize(dtype, out=out, scratch=scratch)


def _use_fused(x: torch.Tensor) -> bool:
    """The fused Triton dequantize-matmul pays off for few rows on CUDA (see deltaw.quant.triton)."""
    if x.device.type != "cuda" or x.dtype not in (torch.float16, torch.bfloat16):
        return False
    from deltaw.quant.triton import FUSED_MAX_ROWS, triton_available

    return triton_available() and x.numel() // x.shape[-1] <= FUSED_MAX_ROWS


class _LinearNF4(torch.autograd.Function):
    """x [..., in] -> [..., out] through a frozen NF4 weight; the gradient flows to x (and a trainable bias)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: NF4Weight, bias: torch.Tensor | None) -> torch.Tensor:
        compute = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        ctx.weight, ctx.compute, ctx.has_bias = weight, compute, bias is not None
        x, bias = x.to(compute), None if bias is None else bias.to(compute)
        if _use_fused(x):
            from deltaw.quant.triton import matmul_nf4_cuda

            y = matmul_nf4_cuda(x.reshape(-1, x.shape[-1]).contiguous(), weight).view(*x.shape[:-1], -1)
            return y if bias is None else y + bias
        return F.linear(x, dequantize_for(weight, compute), bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out.to(ctx.compute) @ dequantize_for(ctx.weight, ctx.compute)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, None, grad_bias


def linear_nf4(x: torch.Tensor, weight: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear with an NF4 weight: x [..., in], weight [out, in] (NF4), bias [out] -> [..., out]."""
    return _LinearNF4.apply(x, weight, bias)


class NF4Linear(nn.Module):
    """A frozen nn.Linear whose weight is NF4 (`weight` is an NF4Weight module; `bias` stays as it was)."""

    def __init__(self, weight: NF4Weight, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.bias = bias

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True) -> NF4Linear:
        """Quantize `linear.weight`; the bias is kept (frozen) in its own dtype."""
        bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        return cls(quantize(linear.weight.detach(), blocksize, double_quant), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in] -> [..., out]."""
        return linear_nf4(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_linears(model: nn.Module, names: Iterable[str], blocksize: int = 64, double_quant: bool = True) -> int:
    """Replace each named nn.Linear of `model` by an NF4Linear, freeing its float weight as it goes.

    Returns the number of weights quantized. Layers are converted one at a time, so the peak memory is
    the model plus one layer's float weight.
    """
    count = 0
    for name in names:
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name} is {type(linear).__name__}, not nn.Linear: only plain linear layers are "
                            "quantized (quantize before adding LoRA adapters)")
        model.set_submodule(name, NF4Linear.from_linear(linear, blocksize, double_quant))
        count += linear.weight.numel()
        del linear
    return count


def quantized_layers(model: nn.Module) -> dict[str, NF4Weight]:
    """Every NF4 weight in `model` by the dotted name of the module that owns it."""
    return {name.removesuffix(".weight"): module for name, module in model.named_modules()
            if isinstance(module, NF4Weight)}
