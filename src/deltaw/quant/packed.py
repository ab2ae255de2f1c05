"""The frozen base weight prepacked for oneDNN (bf16 on a CPU): the same y = x·Wᵀ + b, computed faster.

`F.linear` on a bf16 CPU tensor calls oneDNN, which reorders W into its blocked layout on every call. A
serving forward never changes W, so the reorder can be done once (`pack`) and every later call
(`linear_packed`) reads the blocked copy. The results are the same bits as F.linear's (the same oneDNN
kernel after the same reorder; tests/unit/test_packed.py holds them to it for several row counts).
Measured on this repository's 2-core CPU, 16 rows of the bundled model's shapes, one thread: 576x576
71 -> 40 µs, 1536x576 156 -> 76 µs; the 49152x576 head, bound by memory, 20.3 -> 18.0 ms.

The packed copy is held beside the weight (which the rest of deltaw reads: fingerprints, merging, DoRA
norms), so a packed layer holds its weight twice; `packable` says where packing applies (bf16 weights on a
CPU whose oneDNN has bf16 kernels, no gradient wanted). DELTAW_PACKED_LINEAR=0 turns it off.
"""

from __future__ import annotations

import functools
import os

import torch

BATCH_HINT = 16  # the row count oneDNN tunes its blocked layout for (any count works)
THIN_ROWS = 64
"""Up to this many rows (decode), a LoRA delta's thin products run prepacked; above it (prefill) Bᵀ is accumulated
into the output by addmm_, which wins there (rank 32 into 3,072 columns, one thread: 16 rows 56 vs 82 µs prepacked
vs addmm_; 228 rows 538 vs 376 µs; 1,000 rows 2,082 vs 895 µs)."""


def packable(weight: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether `weight` [out, in] can be prepacked for inputs like `x`: bf16 on a CPU with oneDNN bf16 kernels,
    outside autograd, and not turned off by DELTAW_PACKED_LINEAR=0."""
    return (weight.dtype == torch.bfloat16 and x.dtype == torch.bfloat16 and weight.device.type == "cpu"
            and not torch.is_grad_enabled() and os.environ.get("DELTAW_PACKED_LINEAR", "1") != "0"
            and _onednn_bf16())


@functools.cache
def _onednn_bf16() -> bool:
    """Whether this CPU's oneDNN has bf16 kernels (asked once: it is called for every linear layer)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def pack(weight: torch.Tensor) -> torch.Tensor:
    """`weight` [out, in] in oneDNN's blocked layout (an opaque tensor only `linear_packed` reads)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), BATCH_HINT)


def linear_packed(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] -> x·Wᵀ + b [..., out] with W from `pack`."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
