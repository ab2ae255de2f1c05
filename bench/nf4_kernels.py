"""NF4 forward on CUDA: the fused Triton dequantize-matmul vs dequantize (Triton) + cuBLAS, by number of rows.

Sets where `deltaw.quant.triton.FUSED_MAX_ROWS` should sit: the fused kernel reads 4-bit weights and wins
while the product is bound by reading the weight; cuBLAS wins once it is bound by arithmetic.

    python bench/nf4_kernels.py        (needs a CUDA device and Triton)
"""

from __future__ import annotations

import torch

from deltaw.quant.nf4 import quantize
from deltaw.quant.triton import dequantize_cuda, matmul_nf4_cuda

SHAPES = [(1536, 576), (576, 1536), (8192, 2048), (2048, 8192)]
ROWS = [1, 8, 16, 32, 64, 128, 256, 1024]


def median_ms(fn, repeats: int = 50) -> float:
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> None:
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; median of 50, bf16\n")
    print("| weight (out x in) | rows | fused (ms) | dequantize + cuBLAS (ms) | bf16 cuBLAS, no quantization (ms) |")
    print("|---|---|---|---|---|")
    for out_features, in_features in SHAPES:
        weight = quantize(torch.randn(out_features, in_features, device="cuda") * 0.02)
        weight.dtype = torch.bfloat16
        dense = weight.dequantize(torch.bfloat16)
        for rows in ROWS:
            x = torch.randn(rows, in_features, device="cuda", dtype=torch.bfloat16)
            fused = median_ms(lambda: matmul_nf4_cuda(x, weight))
            split = median_ms(lambda: x @ dequantize_cuda(weight, torch.bfloat16).t())
            plain = median_ms(lambda: x @ dense.t())
            print(f"| {out_features}x{in_features} | {rows} | {fused:.3f} | {split:.3f} | {plain:.3f} |")


if __name__ == "__main__":
    main()
