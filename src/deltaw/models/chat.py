"""Chat prompts: messages rendered with the tokenizer's own chat template."""

from __future__ import annotations

import torch


def chat_inputs(tokenizer, messages: list[dict]) -> dict[str, torch.Tensor]:
    """{"input_ids": [1, T], "attention_mask": [1, T]} for `messages` followed by the assistant's turn."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
