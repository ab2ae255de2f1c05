"""NF4 (QLoRA's 4-bit NormalFloat): quantize, dequantize and pack in bitsandbytes' layout; the frozen 4-bit linear.

    nf4.py      NF4Weight: packed codes and block scales (double quantization), to/from bitsandbytes' state
    linear.py   linear_nf4 (the autograd op that never saves a float weight) and NF4Linear
    triton.py   the CUDA dequantization kernels
"""
