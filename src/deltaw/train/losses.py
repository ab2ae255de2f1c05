"""The causal-LM loss, computed only where there is a label and never holding all logits at once.

A vocabulary of 49k makes the output head the largest matmul of a small model and its fp32 logits the
largest activation ([tokens, 49152] floats: 200 MB for 4×256 tokens, and as much again for their
gradient). With a frozen head (LoRA trains it only when targeted, trainable tokens only when it is tied to
the embedding; otherwise the plain path below), the loss needs only d(loss)/d(hidden):

    logits = h·Wᵀ (chunk of rows)   loss = −Σ log_softmax(logits)[target]   (log_softmax in float32)
    d loss / d h = (softmax(logits) − onehot(target))·W

`FrozenHeadCrossEntropy` computes both chunk by chunk in the forward pass and keeps only the
[N, hidden] gradient for backward, so peak memory holds one chunk of logits, and no work is repeated.
Positions whose label is ignored never reach the head at all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deltaw import compat
from deltaw.adapters.lora import LoRALinear, TokenHead
from deltaw.train.data import IGNORE

CHUNK_ROWS = 256  # [256, 49152] fp32 logits: 50 MB at a time


class FrozenHeadCrossEntropy(torch.autograd.Function):
    """Sum of cross-entropy losses of `hidden @ weight.T` against `targets`; no gradient for `weight`."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """hidden: [N, H]; weight: [V, H] (frozen); targets: [N] -> scalar float32 loss sum."""
        compute = weight.dtype
        accumulate = torch.promote_types(compute, torch.float32)  # at least fp32 for the softmax
        total = torch.zeros((), dtype=accumulate, device=hidden.device)
        grad_hidden = torch.empty_like(hidden, dtype=compute) if ctx.needs_input_grad[0] else None
        for start in range(0, hidden.shape[0], CHUNK_ROWS):
            rows = slice(start, start + CHUNK_ROWS)
            logits = hidden[rows].to(compute) @ weight.t()  # [n, V]
            # a cast and one log_softmax pass, where max, subtract, exp, sum, log and divide took one pass each
            log_probs = torch.log_softmax(logits, dim=1, dtype=accumulate)
            del logits
            target = targets[rows]
            total -= log_probs.gather(1, target[:, None]).sum()
            if grad_hidden is not None:
                probs = log_probs.exp_()
                probs[torch.arange(len(target), device=target.device), target] -= 1.0
                grad_hidden[rows] = probs.to(compute) @ weight
        ctx.save_for_backward(grad_hidden)
        ctx.hidden_dtype = hidden.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad_hidden,) = ctx.saved_tensors
        if grad_hidden is None:
            return None, None, None
        return (grad_hidden * grad_output).to(ctx.hidden_dtype), None, None


def lm_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of next-token losses, number of predicted tokens) for a batch from `deltaw.train.data.collate`.

    Position t predicts labels[t+1]; positions whose next label is IGNORE cost nothing.
    """
    outputs = compat.decoder(model)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    hidden = outputs.last_hidden_state[:, :-1]  # [B, T-1, H]
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE
    hidden, targets = hidden[keep], labels[keep]  # [N, H], [N]
    head = model.get_output_embeddings()
    if _head_is_frozen(head):
        return FrozenHeadCrossEntropy.apply(hidden, head.weight, targets), targets.numel()
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum"), targets.numel()


class CausalLMLoss(nn.Module):
    """The training objective as a module: forward(batch) -> (sum of next-token losses, predicted tokens).

    DistributedDataParallel and fully_shard hook a module's forward, and the loss reads the output head's
    weight outside the model's own forward (`lm_loss_sum`), so the module they wrap is this one.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        """input_ids, attention_mask, labels: [B, T] (see `deltaw.train.data.collate`)."""
        return lm_loss_sum(self.model, {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})


def _head_is_frozen(head: nn.Module) -> bool:
    """True when the head is a plain linear map whose weight gets no gradient: not when LoRA adapts it, nor
    when it follows trainable token rows (a tied head); those take the plain path and train."""
    if isinstance(head, (LoRALinear, TokenHead)):
        return head.active is None and not head.weight.requires_grad and head.bias is None
    return isinstance(head, nn.Linear) and head.bias is None and not head.weight.requires_grad
