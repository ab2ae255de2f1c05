"""deltaw's eager attention for training on CPU: transformers' eager attention, with less memory traffic.

transformers' `eager_attention_forward` repeats the key/value heads for grouped-query attention, scales
the [batch, heads, q, kv] scores in a separate pass, and computes the softmax into float32 and casts it
back. On the bundled model (bf16, 4x256 tokens) those passes over the scores and their gradients cost
more than the attention matmuls themselves. This function computes the same attention:

    scores = (q·scaling)·kᵀ + mask      probabilities = softmax(scores)      out = probabilities·v

    - grouped-query attention without copying keys and values: the g query heads that share a key/value
      head are stacked into one matrix [batch, kv_heads, g·q, d], so one batched matmul serves them all,
      and the key/value gradients come out summed over the group with no extra reduction;
    - the scaling multiplies the queries ([.., q, d]) instead of the scores ([.., q, kv]): exact when
      scaling is a power of two (1/8 for head_dim 64), otherwise within one rounding of the compute dtype;
    - the mask is added in place and the softmax runs in the scores' dtype (PyTorch's CPU kernel
      accumulates reduced precision in float32), so the probabilities equal transformers' fp32 softmax
      rounded once to bf16, without the float32 copy.

It is registered with transformers as "deltaw_eager" (masks built as for "eager"); `deltaw train`
chooses it where it chose eager (`deltaw.train.loop.choose_attention`). Attention layers with extras
this function does not implement (logit soft-capping, attention sinks) run transformers' eager function.
"""

from __future__ import annotations

import torch
from torch import nn

from deltaw import compat

EAGER = "deltaw_eager"


def eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """query [b, heads, q, d], key/value [b, kv_heads, kv, d], attention_mask [b|1, 1|heads, q, kv] additive
    -> (output [b, q, heads, d], probabilities [b, heads, q, kv])."""
    if kwargs.get("softcap") is not None or getattr(module, "sinks", None) is not None:
        return compat.eager_attention(module)(module, query, key, value, attention_mask, scaling=scaling,
                                              dropout=dropout, **kwargs)
    batch, heads, q_len, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    group = heads // kv_heads
    stacked = (query * scaling).reshape(batch, kv_heads, group * q_len, dim)  # [b, kv_heads, g·q, d]
    scores = torch.matmul(stacked, key.transpose(2, 3))  # [b, kv_heads, g·q, kv]
    if attention_mask is not None:  # in place on the matmul's own output (a view would cost autograd copies)
        scores.add_(_grouped(attention_mask, kv_heads, group).to(scores.dtype))
    probabilities = torch.softmax(scores, dim=-1)
    probabilities = nn.functional.dropout(probabilities, p=dropout, training=module.training)
    out = torch.matmul(probabilities, value)  # [b, kv_heads, g·q, d]
    out = out.view(batch, heads, q_len, dim).transpose(1, 2).contiguous()
    return out, probabilities.view(batch, heads, q_len, kv_len)


def _grouped(mask: torch.Tensor, kv_heads: int, group: int) -> torch.Tensor:
    """An additive mask [b|1, 1|heads, q, kv] as [b|1, 1|kv_heads, group·q, kv], to add to the stacked scores
    (a mask shared by all heads is repeated for the `group` query heads stacked under each key/value head)."""
    rows, q_len, kv_len = mask.shape[0], mask.shape[2], mask.shape[3]
    if mask.shape[1] == 1:
        return mask[:, :, None].expand(-1, -1, group, -1, -1).reshape(rows, 1, group * q_len, kv_len)
    return mask.view(rows, kv_heads, group * q_len, kv_len)


compat.register_attention(EAGER, eager_attention, masks_like="eager")
