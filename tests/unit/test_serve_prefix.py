"""Prefix-tuning adapters in the serving engine: per request, in the same batches as LoRA adapters."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import deltaw
from deltaw.adapters.prefix import PrefixConfig
from deltaw.adapters.prefix import add_prefix
from deltaw.serve.bank import AdapterBank
from deltaw.serve.engine import Engine, SamplingParams
from tests.conftest import make_tiny_llama
from tests.unit.test_bank import ALL, write_random_adapter

PROMPTS = [[5, 9, 17, 3, 44, 12], [7, 7, 8], [100, 3, 55, 21, 9, 10, 11, 60, 2, 30], [1, 4], [60, 61]]
CHOICES = ["pirate", "full", None, "short", "pirate"]
GREEDY = SamplingParams(max_tokens=10)


def write_prefix(path: Path, tokens: int, seed: int) -> Path:
    model = make_tiny_llama()
    torch.manual_seed(seed)
    add_prefix(model, PrefixConfig(num_virtual_tokens=tokens))
    return deltaw.save_adapter(model, path, "default")


@pytest.fixture
def engine(tmp_path: Path, tokenizer):
    """The tiny Llama serving LoRA "full" and prefix adapters "pirate" (6 tokens) and "short" (2 tokens)."""
    model = make_tiny_llama()
    bank = AdapterBank(model, max_resident=2)
    bank.load("full", write_random_adapter(tmp_path / "full", model, ALL, rank=8, seed=2, std=1.0))
    bank.load("pirate", write_prefix(tmp_path / "pirate", 6, seed=3))
    bank.load("short", write_prefix(tmp_path / "short", 2, seed=4))
    engine = Engine(model, tokenizer, bank, max_batch_size=8, max_model_len=128)
    engine.eos_ids = set()
    with engine:
        yield engine


def run(engine: Engine, prompt: list[int], adapter) -> list[int]:
    return [event.token_id for event in engine.submit(prompt, adapter, GREEDY) if event.token_id is not None]


def test_prefix_and_lora_requests_in_one_batch_each_give_their_solo_output(engine, tmp_path):
    solo = [run(engine, prompt, choice) for prompt, choice in zip(PROMPTS, CHOICES)]
    handles = [engine.submit(prompt, choice, GREEDY) for prompt, choice in zip(PROMPTS, CHOICES)]
    batched = [[event.token_id for event in handle if event.token_id is not None] for handle in handles]
    assert batched == solo
    # a solo prefix request is what transformers' generate gives with the prefix adapter loaded
    model = copy.deepcopy(make_tiny_llama())
    deltaw.load_adapter(model, tmp_path / "pirate", "pirate")
    deltaw.set_adapter(model, "pirate")
    with torch.no_grad():
        expected = model.generate(input_ids=torch.tensor([PROMPTS[0]]), attention_mask=torch.ones(1, 6, dtype=torch.long),
                                  max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert solo[0] == expected[0, 6:].tolist()
    base = run(engine, PROMPTS[0], None)
    assert solo[0] != base  # the prefix changes the output


def test_the_bank_lists_prefix_adapters_and_refuses_them_in_a_mix(engine):
    assert engine.bank.names() == ["full", "pirate", "short"]
    assert "pirate" in engine.bank.resident()
    before = engine.bank.memory_bytes()["adapters"]
    with pytest.raises(ValueError, match="'pirate' is a prefix adapter, which cannot be part of a weighted mix"):
        engine.submit([1, 2], {"pirate": 0.5, "full": 0.5}, GREEDY)
    engine.bank.unload("pirate")
    assert before - engine.bank.memory_bytes()["adapters"] == 6 * 2 * 2 * 2 * 16 * 4  # T x layers x K,V x heads x d, fp32
    with pytest.raises(KeyError, match="no adapter named 'pirate'"):
        engine.submit([1, 2], "pirate", GREEDY)
