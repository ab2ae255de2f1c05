"""LoRA layers that read the same input, trained as one autograd node with one GEMM for all their A's.

In a Llama-style block, q_proj, k_proj and v_proj read the same hidden states, and so do gate_proj and
up_proj. Trained one by one, each LoRA layer reads x again for its own thin A·x ([tokens, r]: a GEMM
bound by memory, not arithmetic), and autograd adds each layer's contribution to dx in a pass of its own.
`SharedInputLoRA` computes the layers of a group together, for m layers with ranks r_i:

    forward:   X·[A_1; ...; A_m]ᵀ = [XA_1 ... XA_m]        one GEMM  [N, in] x [in, Σr]
               Y_i = X·W_iᵀ + b_i + s_i·XA_i·B_iᵀ          the B product accumulated into Y_i in place
    backward:  G_i·B_i·s_i = GA_i  -> [GA_1 ... GA_m]      [N, Σr]
               dA = [GA]ᵀ·X  (one GEMM, split)     dB_i = s_i·G_iᵀ·XA_i
               dX = [GA]·[A] + Σ G_i·W_i                    every term accumulated by a GEMM into one buffer

It saves X, XA and the (compute-dtype) A's, which the per-layer path saves too, and casts each adapter
weight once. The base weight is read in place, or dequantized (NF4) in forward and again in backward.

The first layer of a group that is called computes every member's output and keeps the others' until
they are called with the very same input tensor (transformers calls q/k/v and gate/up that way); any
other call, or a group whose members cannot be fused (different active adapters, DoRA, dropout, a merged
adapter, no gradient wanted), runs layer by layer. A layer alone (o_proj, down_proj) uses the same node
with m = 1. Adapter files, merging and serving are untouched: only the training forward changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from deltaw.quant.linear import dequantize_for
from deltaw.quant.nf4 import NF4Weight

SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""Sibling layers (same parent module) that transformers calls with the same input tensor."""

ENABLED = True
"""False runs every LoRA layer on its own, through plain autograd (the reference the tests compare with)."""


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the matmuls run in: autocast's when it is on for x's device, else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _base_weight(weight: torch.Tensor | NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    """W [out, in] in `dtype`; an NF4 weight is dequantized into a workspace valid until the next call."""
    return dequantize_for(weight, dtype) if isinstance(weight, NF4Weight) else weight.to(dtype)


class SharedInputLoRA(torch.autograd.Function):
    """Y_i = X·W_iᵀ + b_i + s_i·(X·A_iᵀ)·B_iᵀ for layers i = 1..m reading the same X (see the module doc)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layers: tuple[nn.Module, ...], name: str, *params: torch.Tensor | None):
        """x: [..., in]; params: (A_i [r_i, in], B_i [out_i, r_i], b_i [out_i] or None) per layer
        -> (Y_1 [..., out_1], ..., Y_m [..., out_m])."""
        dtype = compute_dtype(x)
        rows = x.reshape(-1, x.shape[-1]).to(dtype)  # [N, in]
        lora_a = torch.cat([params[3 * i].to(dtype) for i in range(len(layers))])  # [Σr, in]
        ranks = [params[3 * i].shape[0] for i in range(len(layers))]
        xa = rows @ lora_a.t()  # [N, Σr]
        outputs = []
        for i, (layer, part) in enumerate(zip(layers, xa.split(ranks, dim=1))):
            bias = params[3 * i + 2]
            y = F.linear(rows, _base_weight(layer.weight, dtype), None if bias is None else bias.to(dtype))
            y.addmm_(part, params[3 * i + 1].to(dtype).t(), alpha=layer.scaling[name])
            outputs.append(y.view(*x.shape[:-1], -1))
        ctx.save_for_backward(rows, xa, lora_a, *params[1::3])
        ctx.layers, ctx.adapter, ctx.ranks, ctx.x_dtype = layers, name, ranks, x.dtype
        ctx.x_shape, ctx.has_bias = x.shape, [params[3 * i + 2] is not None for i in range(len(layers))]
        ctx.param_dtypes = [p.dtype if p is not None else None for p in params]
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        rows, xa, lora_a, *lora_bs = ctx.saved_tensors
        dtype = rows.dtype
        scalings = [layer.scaling[ctx.adapter] for layer in ctx.layers]
        grads = [g.reshape(-1, g.shape[-1]).to(dtype) for g in grads]  # [N, out_i]
        grad_xa = torch.cat([(g @ b.to(dtype)).mul_(s) for g, b, s in zip(grads, lora_bs, scalings)], dim=1)
        grad_params: list[torch.Tensor | None] = []
        grad_a = (grad_xa.t() @ rows).split(ctx.ranks)  # [r_i, in]
        for i, (g, part, s) in enumerate(zip(grads, xa.split(ctx.ranks, dim=1), scalings)):
            grad_b = (g.t() @ part).mul_(s)  # [out_i, r_i]
            grad_bias = g.sum(0) if ctx.has_bias[i] and ctx.needs_input_grad[3 + 3 * i + 2] else None
            grad_params += [grad_a[i], grad_b, grad_bias]
        grad_params = [None if g is None or not ctx.needs_input_grad[3 + j] else g.to(ctx.param_dtypes[j])
                       for j, g in enumerate(grad_params)]
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_xa @ lora_a  # [N, in]
            for layer, g in zip(ctx.layers, grads):
                grad_x.addmm_(g, _base_weight(layer.weight, dtype))
            grad_x = grad_x.view(ctx.x_shape).to(ctx.x_dtype)
        return grad_x, None, None, *grad_params


@dataclass(eq=False)
class SharedInput:
    """LoRA layers of one module that read the same input, and the outputs computed ahead for them.

    Attributes:
        members: the layers, in SHARED_INPUTS order.
        source: the input tensor the kept outputs were computed from (None: nothing kept).
        kept: member index -> its output [..., out], waiting for that member's call with `source`.
    """

    members: list[nn.Module]
    source: torch.Tensor | None = None
    kept: dict[int, torch.Tensor] = field(default_factory=dict)

    def output(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """`layer`'s output for x [..., in] with its active adapter (`layer` must be `fusable`): kept from the
        group's node if it was computed for this very x, else from a new node for every fusable member."""
        index = self.members.index(layer)
        if self.source is x and index in self.kept:
            output = self.kept.pop(index)
            if not self.kept:
                self.source = None
            return output
        self.source, self.kept = None, {}
        if not all(fusable(member, layer.active, x) for member in self.members):
            return lora_forward(x, [layer], layer.active)[0]
        outputs = lora_forward(x, self.members, layer.active)
        self.source, self.kept = x, {i: y for i, y in enumerate(outputs) if i != index}
        return outputs[index]


def fusable(layer: nn.Module, name: str | None, x: torch.Tensor) -> bool:
    """Whether `layer` can run adapter `name` in the fused node: plain LoRA (no DoRA), no dropout at work, nothing
    merged, gradients wanted (but none for the base weight, which the node treats as frozen), and one compute
    dtype for everything (autocast, or all dtypes equal)."""
    if not ENABLED or name is None or layer.active != name or layer.merged is not None or not layer.has(name):
        return False
    if getattr(layer.weight, "requires_grad", False):
        return False
    if layer.is_dora(name) or (layer.lora_dropout[name] > 0 and layer.training) or not torch.is_grad_enabled():
        return False
    if torch.is_autocast_enabled(x.device.type):
        return True
    dtypes = {x.dtype, layer.lora_A[name].dtype, layer.lora_B[name].dtype}
    dtypes.add(layer.weight.dtype)
    return len(dtypes) == 1


def lora_forward(x: torch.Tensor, layers: list[nn.Module], name: str) -> tuple[torch.Tensor, ...]:
    """Every layer's output for x [..., in] with adapter `name`, through one SharedInputLoRA node."""
    params: list[torch.Tensor | None] = []
    for layer in layers:
        params += [layer.lora_A[name], layer.lora_B[name], layer.bias]
    return SharedInputLoRA.apply(x, tuple(layers), name, *params)


def join_siblings(model: nn.Module, module_name: str, layer: nn.Module) -> None:
    """Put the freshly wrapped `layer` (at `module_name`) in a SharedInput group with its wrapped siblings."""
    parent_name, _, own = module_name.rpartition(".")
    parent = model.get_submodule(parent_name)
    for names in SHARED_INPUTS:
        if own not in names:
            continue
        members = [getattr(parent, n) for n in names if getattr(getattr(parent, n, None), "wraps_linear", False)]
        members = [m for m in members if m.in_features == layer.in_features and hasattr(m, "shared_input")]
        if len(members) > 1:
            group = SharedInput(members)
            for member in members:
                member.shared_input = group
