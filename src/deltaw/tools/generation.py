"""Text generation on a base model with named adapters: prompts in, text out (optionally streamed)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from deltaw.adapters import disable_adapters, load_adapter, parse_adapter_spec, require_adapter, set_adapter
from deltaw.models.loading import BUNDLED_NAME, DTYPES, load_model


@dataclass
class GenerationOptions:
    """How `deltaw generate` and `deltaw chat` generate.

    Attributes:
        model: base model.
        adapter: NAME=DIR: load an adapter under a name (repeatable).
        use: the adapter to start with (default: the only one loaded).
        max_new_tokens: most tokens to generate per answer.
        temperature: 0 is greedy; above 0 samples.
        top_p: sample from the smallest set of tokens whose probability reaches top_p.
        seed: seed for sampling.
        dtype: the weights' dtype.
    """

    model: str = BUNDLED_NAME
    adapter: list[str] = field(default_factory=list, metadata={"repeat": True, "metavar": "NAME=DIR"})
    use: str | None = None
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    dtype: str = field(default="fp32", metadata={"choices": tuple(DTYPES)})


def load_with_adapters(
    model_name: str, adapter_specs: Sequence[str], dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, object]:
    """Load a base model and each 'name=DIR' adapter onto it (none active)."""
    model, tokenizer = load_model(model_name, dtype=dtype)
    for spec in adapter_specs:
        name, path = parse_adapter_spec(spec)
        load_adapter(model, path, name)
    return model, tokenizer


def generate(
    model: nn.Module,
    tokenizer,
    inputs: dict[str, torch.Tensor],
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    streamer=None,
) -> list[str]:
    """Generate from a (left-padded) batch: greedy when temperature is 0. Returns the new text per row."""
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, found {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, found {temperature} and {top_p}")
    if seed is not None:
        torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {
        "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=pad_id, streamer=streamer,
                                **sampling)
    new = output[:, inputs["input_ids"].shape[1]:]
    return tokenizer.batch_decode(new, skip_special_tokens=True)


def answer_questions(
    model: nn.Module, tokenizer, questions: Sequence[str], adapter: str | None,
    max_new_tokens: int = 64, batch_size: int = 16,
) -> list[str]:
    """Greedy chat answers to `questions` with `adapter` active (None: the base model)."""
    if adapter is not None:
        require_adapter(model, adapter)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    answers = []
    try:
        for start in range(0, len(questions), batch_size):
            texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                   add_generation_prompt=True)
                     for q in questions[start : start + batch_size]]
            inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            if adapter is None:
                with disable_adapters(model):
                    answers += generate(model, tokenizer, inputs, max_new_tokens)
            else:
                set_adapter(model, adapter)
                answers += generate(model, tokenizer, inputs, max_new_tokens)
    finally:
        tokenizer.padding_side = side
    return [answer.strip() for answer in answers]
