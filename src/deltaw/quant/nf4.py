"""4-bit NormalFloat (NF4) with double quantization, in bitsandbytes' layout.

Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs" (2023).

    weight [out, in] --flatten (row-major)--> blocks of 64 --/absmax per block--> [-1, 1]
        --> nearest of the 16 NF4 codes (ties to the lower code) --> two codes per byte, first in the high nibble
    absmax [blocks] fp32 --double quantization--> (absmax − mean) in blocks of 256, each scaled by its own
        absmax and rounded to bitsandbytes' signed 8-bit dynamic map; the mean is kept as an offset

    dequantize:  code[q] · absmax_block           absmax_block = dyn[q₂] · absmax₂ + offset   (fp32)

Storage per parameter: 4 bits + 8/64 (absmax byte) + 32/(64·256) (fp32 second-level absmax)
= 4.127 bits. The arithmetic follows bitsandbytes' reference kernels operation for operation (reciprocal
multiply for full blocks, division for a last partial block, clamping, bucketing by code midpoints),
so packed bytes and absmax are byte-identical to `bitsandbytes.functional.quantize_4bit` without
double quantization, and bitsandbytes' dequantization reproduces deltaw's values exactly.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
import torch
from torch import nn

# The 16 NF4 values (quantiles of N(0, 1) normalized to [-1, 1], with an exact zero), as fp32.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)
NESTED_BLOCKSIZE = 256
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' dynamic 8-bit code (Dettmers 2015): a sign, a unary exponent (10⁻⁶ … 10⁰), and a
    linear fraction in the remaining bits; 256 sorted fp32 values including 0 and 1."""
    values: list[float] = []
    non_sign_bits = total_bits - 1
    extra = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for exponent in range(max_exponent_bits):
        count = 2 ** (exponent + non_sign_bits - max_exponent_bits) + 1 if signed else \
            2 ** (exponent + non_sign_bits - max_exponent_bits + 1) + 1
        edges = torch.linspace(0.1, 1, count, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + exponent)
        values += (scale * means).tolist()
        if signed:
            values += (-scale * means).tolist()
    if extra > 0:
        edges = torch.linspace(0.1, 1, extra + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1)
        values += (scale * means).tolist()
        if signed:
            values += (-scale * means).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (2**total_bits - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


@functools.lru_cache(maxsize=None)
def shared_dynamic_map(device: torch.device) -> torch.Tensor:
    """One dynamic map per device, shared by every double-quantized weight (it is never modified)."""
    return dynamic_map().to(device)


def _blockwise(values: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale each block of the flattened fp32 `values` into [-1, 1] and take the nearest code (ties to the
    lower one). Returns (code indices [n] int64, absmax [blocks] fp32)."""
    flat = values.reshape(-1).float()
    count = flat.numel()
    tail = count % blocksize
    full = count - tail
    blocks = flat[:full].reshape(-1, blocksize)
    absmax = blocks.abs().max(dim=-1)[0]
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if tail:
        last = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, last.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / last, -1, 1)])
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, midpoints), absmax


def _scale_blocks_(values: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Multiply `values` [n] fp32 in place by the absmax of their block; returns `values`."""
    count = values.numel()
    tail = count % blocksize
    full = count - tail
    values[:full].view(-1, blocksize).mul_(absmax[: full // blocksize].view(-1, 1))
    if tail:
        values[full:].mul_(absmax[-1])
    return values


@functools.lru_cache(maxsize=None)
def _code_pairs(device: torch.device) -> torch.Tensor:
    """[256] int64: byte b -> the two fp32 values (code[b >> 4], code[b & 15]) side by side in memory, as one
    64-bit word, so one gather of 8-byte elements unpacks both nibbles of a byte (a 1-D gather: on CPU ~6x
    faster than gathering rows of a [256, 2] float table); `.view(torch.float32)` reads the values back."""
    pairs = torch.stack([NF4_CODE.repeat_interleave(16), NF4_CODE.repeat(16)], dim=1).contiguous()
    return pairs.view(torch.int64).view(-1).to(device)


class NF4Weight(nn.Module):
    """A frozen weight stored as NF4: the 4-bit codes and their block scales, as buffers.

    A module (not a tensor) so that `model.to(device)` moves it with the model. `model.to(dtype)`,
    `.half()` and the like change only `dtype`, the compute dtype that `dequantize()` returns by
    default: the quantization state itself stays uint8/fp32, so a cast never degrades it.

    Attributes:
        packed: [ceil(n/2)] uint8, two codes per byte, the first in the high nibble.
        shape: the original shape [out, in]; dtype: the compute dtype (initially the original dtype).
        blocksize: values per absmax (64).
        absmax: [blocks] fp32, or, with double quantization, [blocks] uint8 indices into `nested_code`.
        nested_absmax: [ceil(blocks/256)] fp32; nested_code: [256] fp32; offset: the mean removed (None
            without double quantization).
    """

    def __init__(
        self,
        packed: torch.Tensor,
        shape: torch.Size,
        dtype: torch.dtype,
        blocksize: int,
        absmax: torch.Tensor,
        nested_absmax: torch.Tensor | None = None,
        nested_code: torch.Tensor | None = None,
        offset: float | None = None,
    ) -> None:
        super().__init__()
        self.shape, self.dtype, self.blocksize, self.offset = torch.Size(shape), dtype, blocksize, offset
        self.register_buffer("packed", packed)
        self.register_buffer("absmax", absmax)
        self.register_buffer("nested_absmax", nested_absmax)
        self.register_buffer("nested_code", nested_code)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def numel(self) -> int:
        return self.shape.numel()

    def get_extra_state(self) -> dict:
        """The non-tensor state, so that `state_dict()` / `load_state_dict()` carry the whole weight."""
        return {"shape": list(self.shape), "dtype": str(self.dtype).removeprefix("torch."),
                "blocksize": self.blocksize, "offset": self.offset}

    def set_extra_state(self, state: dict) -> None:
        self.shape, self.blocksize, self.offset = torch.Size(state["shape"]), state["blocksize"], state["offset"]
        self.dtype = getattr(torch, state["dtype"])

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> NF4Weight:
        """Follow device moves; take a float cast as the new compute dtype without touching the state."""
        probe = fn(torch.empty(0, dtype=self.dtype, device=self.device))
        if probe.is_floating_point():
            self.dtype = probe.dtype
        for name, buffer in self._buffers.items():
            if buffer is not None:
                self._buffers[name] = buffer.to(probe.device)
        for name, param in self._parameters.items():
            if param is not None and param.device != probe.device:
                self._parameters[name] = nn.Parameter(param.to(probe.device), requires_grad=False)
        return self

    def hold_as_parameters(self) -> NF4Weight:
        """Hold the packed codes and block scales as frozen parameters instead of buffers; returns self.

        FSDP2 (`fully_shard`) shards a module's parameters and never its buffers, so this is what lets each
        rank keep 1/N of a 4-bit base, as Answer.AI's FSDP+QLoRA stored bitsandbytes' packed weights in a
        shardable dtype. uint8 parameters suit FSDP2, which all-gathers mixed dtypes as bytes; each tensor
        is gathered whole (`packed` [n/2] uint8) before `dequantize` reads it, so dequantization is the same
        block-wise one. The nested code table stays a buffer (one 256-entry table that every layer shares).
        State-dict keys do not change.
        """
        for name in ("packed", "absmax", "nested_absmax"):
            tensor = self._buffers.pop(name, None)
            if tensor is None:
                self.register_buffer(name, None)
            else:
                self.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
        return self

    def block_absmax(self) -> torch.Tensor:
        """[blocks] fp32 absmax, dequantized from 8 bits with double quantization."""
        if not self.double_quant:
            return self.absmax
        values = torch.index_select(self.nested_code, 0, self.absmax.int())
        return _scale_blocks_(values, self.nested_absmax, NESTED_BLOCKSIZE).add_(self.offset)

    def dequantize(
        self,
        dtype: torch.dtype | None = None,
        out: torch.Tensor | None = None,
        scratch: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The weight [shape] in `dtype` (default: the compute dtype): code[q] · absmax, computed in fp32.

        One gather of a [256] table of value pairs unpacks both nibbles of each byte; the scaling is in place.
        `out` (numel values, any float dtype) receives the result; `scratch` = (int32 [bytes], fp32
        [2·bytes]) holds the intermediates. With both given, nothing is allocated (see nf4_linear).
        """
        table = _code_pairs(self.device)
        if scratch is None:
            pairs = torch.index_select(table, 0, self.packed.int())
        else:
            indices, pairs = scratch[0].copy_(self.packed), scratch[1].view(torch.int64)
            torch.index_select(table, 0, indices, out=pairs)
        pairs = pairs.view(torch.float32)
        values = pairs.view(-1)[: self.shape.numel()]
        values = _scale_blocks_(values, self.block_absmax(), self.blocksize)
        if out is None:
            return values.view(self.shape).to(dtype or self.dtype)
        if out.data_ptr() != values.data_ptr():
            out.view(-1).copy_(values)
        return out.view(self.shape)

    @property
    def nbytes(self) -> int:
        parts = [self.packed, self.absmax] + ([self.nested_absmax, self.nested_code] if self.double_quant else [])
        return sum(t.numel() * t.element_size() for t in parts) + (4 if self.double_quant else 0)

    def bits_per_parameter(self, include_code_tables: bool = False) -> float:
        """Storage per weight; the 256-entry nested code table is shared by all layers unless included."""
        nbytes = self.nbytes - (0 if include_code_tables or not self.double_quant else self.nested_code.numel() * 4)
        return 8 * nbytes / self.shape.numel()

    def extra_repr(self) -> str:
        return (f"shape={list(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}, bits_per_parameter={self.bits_per_parameter():.3f}")


def quantize(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """NF4-quantize `weight` (any shape, any float dtype) in blocks of `blocksize` values."""
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, found {blocksize}")
    if not weight.is_floating_point():
        raise TypeError(f"NF4 quantizes floating-point weights, found {weight.dtype}")
    if not torch.isfinite(weight).all():
        raise ValueError("the weight has NaN or Inf values, which NF4 cannot represent (a whole block would be NaN)")
    codes, absmax = _blockwise(weight.detach(), NF4_CODE.to(weight.device), blocksize)
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_full((1,), 7)])  # pad with the code of 0.0
    codes = codes.to(torch.uint8)
    packed = (codes[::2] << 4) | codes[1::2]
    if not double_quant:
        return NF4Weight(packed, weight.shape, weight.dtype, blocksize, absmax)
    offset = absmax.mean()
    nested_code = shared_dynamic_map(weight.device)
    indices, nested_absmax = _blockwise(absmax - offset, nested_code, NESTED_BLOCKSIZE)
    return NF4Weight(packed, weight.shape, weight.dtype, blocksize, indices.to(torch.uint8), nested_absmax,
                     nested_code, float(offset))


# --------------------------------------------------------------------------------------------- bitsandbytes layout
def to_bnb(weight: NF4Weight, prefix: str = "weight") -> dict[str, torch.Tensor]:
    """The tensors bitsandbytes' Linear4bit writes to a state dict (`weight`, `weight.absmax`, ...)."""
    info = {"quant_type": "nf4", "blocksize": weight.blocksize, "dtype": str(weight.dtype).removeprefix("torch."),
            "shape": list(weight.shape)}
    state = {prefix: weight.packed.reshape(-1, 1), f"{prefix}.absmax": weight.absmax,
             f"{prefix}.quant_map": NF4_CODE.clone()}
    if weight.double_quant:
        info.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=weight.offset)
        state[f"{prefix}.nested_absmax"] = weight.nested_absmax
        state[f"{prefix}.nested_quant_map"] = weight.nested_code.clone()
    state[f"{prefix}.quant_state.bitsandbytes__nf4"] = torch.tensor(list(json.dumps(info).encode()), dtype=torch.uint8)
    return state


def from_bnb(state: dict[str, torch.Tensor], prefix: str = "weight") -> NF4Weight:
    """Read bitsandbytes' serialized 4-bit state (as written by Linear4bit) into an NF4Weight."""
    key = f"{prefix}.quant_state.bitsandbytes__nf4"
    if key not in state:
        found = [k for k in state if "quant_state" in k]
        raise ValueError(f"missing {key!r} (found {found or 'no quant_state'}); only NF4 states can be read")
    missing = [k for k in (prefix, f"{prefix}.absmax", f"{prefix}.quant_map") if k not in state]
    if missing:
        raise ValueError(f"the 4-bit state of {prefix!r} lacks {missing}: not a complete bitsandbytes NF4 state")
    info = json.loads(bytes(state[key].cpu().numpy().tolist()).decode())
    code = state[f"{prefix}.quant_map"].float()
    if not torch.equal(code.cpu(), NF4_CODE):
        raise ValueError(f"{prefix}.quant_map is not the NF4 code table")
    nested = f"{prefix}.nested_absmax" in state
    return NF4Weight(
        packed=state[prefix].reshape(-1).view(torch.uint8),
        shape=torch.Size(info["shape"]),
        dtype=getattr(torch, info["dtype"]),
        blocksize=int(info["blocksize"]),
        absmax=state[f"{prefix}.absmax"],
        nested_absmax=state[f"{prefix}.nested_absmax"].float() if nested else None,
        nested_code=_shared_if_standard(state[f"{prefix}.nested_quant_map"].float()) if nested else None,
        offset=float(info["nested_offset"]) if nested else None,
    )


def _shared_if_standard(code: torch.Tensor) -> torch.Tensor:
    """The shared dynamic map when `code` equals it (so loaded layers hold one table, not one each)."""
    shared = shared_dynamic_map(code.device)
    return shared if torch.equal(code, shared) else code
