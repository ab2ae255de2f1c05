"""NF4 on CUDA with Triton: a one-pass dequantize kernel, and a fused dequantize-matmul for the forward.

    dequantize:        out[i] = code[nibble(packed[i // 2], i)] · absmax[i // blocksize]     (one pass)
    matmul (fused):    y[m, n] = Σ_k x[m, k] · code[nibble(W, n·K + k)] · absmax[(n·K + k) // blocksize]
                       W is unpacked tile by tile in registers and never written to memory.

Measured on an H100 (bench/nf4_kernels.py, bench/results/nf4_kernels_h100.md), this fused kernel is
slower than the one-pass dequantize followed by cuBLAS at every row count tried (1 to 1,024 rows; e.g.
0.19 vs 0.07 ms for a 1536x576 weight and one row): its tiles leave most SMs idle for few rows and
unpack each value with gathers. So `linear_nf4` uses it only up to FUSED_MAX_ROWS rows, which is 0
until a split-K / GEMV variant beats cuBLAS; the kernel is kept, tested, and benchmarked.
Both kernels undo double quantization in registers with the same fp32 roundings as torch (no fused
multiply-add), so they match `NF4Weight.dequantize` bit for bit; one launch per dequantized weight.
"""

from __future__ import annotations

import functools

import torch

from deltaw.quant.nf4 import NF4_CODE, NF4Weight

FUSED_MAX_ROWS = 0  # rows up to which linear_nf4 takes the fused kernel (see above)


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when CUDA and Triton are both usable (deltaw falls back to the torch path otherwise)."""
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path is used
    triton = None

if triton is not None:
    from triton.language.extra import libdevice

    @triton.jit
    def _block_scale(block, mask, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                     DOUBLE_QUANT: tl.constexpr):
        """The fp32 absmax of `block`: nested_code[q]·nested_absmax[block // 256] + offset with double
        quantization, rounded as torch rounds it (no fused multiply-add), else the stored fp32 absmax."""
        if DOUBLE_QUANT:
            q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
            scaled = libdevice.mul_rn(tl.load(nested_code_ptr + q, mask=mask, other=0.0),
                                      tl.load(nested_absmax_ptr + block // 256, mask=mask, other=0.0))
            scale = libdevice.add_rn(scaled, offset)
        else:
            scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
        return scale

    @triton.jit
    def _unpack(packed_ptr, code_ptr, flat, mask):
        """code[nibble] of the values at flat indices `flat`: the first of a byte's two is its high nibble."""
        byte = tl.load(packed_ptr + flat // 2, mask=mask, other=0).to(tl.int32)
        nibble = (byte >> ((1 - flat % 2) * 4).to(tl.int32)) & 15
        return tl.load(code_ptr + nibble, mask=mask, other=0.0)

    @triton.jit
    def _dequantize_kernel(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, code_ptr, out_ptr,
                           numel, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, BLOCK: tl.constexpr):
        flat = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = flat < numel
        scale = _block_scale(flat // BLOCKSIZE, mask, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                             DOUBLE_QUANT)
        value = _unpack(packed_ptr, code_ptr, flat, mask) * scale
        tl.store(out_ptr + flat, value.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _matmul_nf4_kernel(x_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, code_ptr,
                           y_ptr, M, N, K, stride_xm, stride_ym, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            ks = start + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :],
                        mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0)
            flat = cols[None, :].to(tl.int64) * K + ks[:, None]  # [BLOCK_K, BLOCK_N]: the tile of Wᵀ
            w_mask = (cols[None, :] < N) & (ks[:, None] < K)
            scale = _block_scale(flat // BLOCKSIZE, w_mask, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                                 DOUBLE_QUANT)
            w = _unpack(packed_ptr, code_ptr, flat, w_mask) * scale
            acc += tl.dot(x, w.to(x.dtype))
        tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(rows[:, None] < M) & (cols[None, :] < N))


@functools.lru_cache(maxsize=None)
def _code(device: torch.device) -> torch.Tensor:
    return NF4_CODE.to(device)


def _state(weight: NF4Weight) -> tuple:
    """The kernels' quantization arguments: absmax, nested absmax, nested code, offset, code table."""
    if weight.double_quant:
        return weight.absmax, weight.nested_absmax, weight.nested_code, weight.offset, _code(weight.device)
    return weight.absmax, weight.absmax, weight.absmax, 0.0, _code(weight.device)


def dequantize_cuda(weight: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    """`weight.dequantize(dtype)` in one Triton kernel: [out, in] in `dtype`."""
    out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    numel = weight.numel()
    block = 1024
    _dequantize_kernel[(triton.cdiv(numel, block),)](
        weight.packed, *_state(weight), out, numel, weight.blocksize, weight.double_quant, block)
    return out


def matmul_nf4_cuda(x: torch.Tensor, weight: NF4Weight) -> torch.Tensor:
    """x [rows, in] (contiguous rows) @ dequantize(weight)ᵀ -> [rows, out], W unpacked in registers."""
    rows, in_features = x.shape
    out_features = weight.shape[0]
    y = torch.empty(rows, out_features, dtype=x.dtype, device=x.device)
    block_m = 16 if rows <= 16 else 32 if rows <= 32 else 64
    grid = (triton.cdiv(rows, block_m), triton.cdiv(out_features, 64))
    _matmul_nf4_kernel[grid](x, weight.packed, *_state(weight), y, rows, out_features, in_features, x.stride(0),
                             y.stride(0), weight.blocksize, weight.double_quant, block_m, 64, 64)
    return y
