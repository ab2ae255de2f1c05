"""The serving engine and adapter bank on the bundled SmolLM2-135M: a mixed batch of four adapters
and the base (one request joining mid-batch) gives every request the same greedy tokens as running
it alone, and 100 adapters load and route at once."""

from __future__ import annotations

import copy

import pytest
import torch

from deltaw.serve.bank import AdapterBank
from deltaw.serve.engine import Engine, SamplingParams
from tests.unit.test_bank import ALL, ATTENTION, write_random_adapter

pytestmark = pytest.mark.slow

ADAPTERS = {  # name -> (target leaves, rank, std of B): different ranks and target sets share the buffers;
    "qv8": (ATTENTION, 8, 0.15),  # B's scale is just large enough to change the answers
    "all4": (ALL, 4, 0.06),
    "down16": (["down_proj"], 16, 0.6),
    "ou8": (["o_proj", "up_proj"], 8, 0.12),
}


@pytest.fixture(scope="module")
def engine(bundled_pristine, tmp_path_factory):
    model, tokenizer = bundled_pristine
    model = copy.deepcopy(model)
    directory = tmp_path_factory.mktemp("adapters")
    bank = AdapterBank(model, max_resident=8)
    for seed, (name, (leaves, rank, std)) in enumerate(ADAPTERS.items(), start=1):
        bank.load(name, write_random_adapter(directory / name, model, leaves, rank, seed=seed, std=std))
    with Engine(model, tokenizer, bank, max_batch_size=16, max_model_len=512) as engine:
        yield engine


def chat_ids(tokenizer, question: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)


def token_ids(handle) -> list[int]:
    return [event.token_id for event in handle if event.token_id is not None]


def test_a_mixed_batch_gives_each_request_its_solo_tokens(engine):
    tokenizer = engine.tokenizer
    questions = ["Describe the sea in one sentence.", "Give me a tip for learning to cook.",
                 "Why do cats purr?"]
    prompts = [chat_ids(tokenizer, q) for q in questions]
    requests = [(prompts[0], choice) for choice in [None, *ADAPTERS]]  # one prompt, every adapter
    requests += [(prompts[1], "all4"), (prompts[2], {"qv8": 0.5, "ou8": 0.5})]
    late = (prompts[2], "down16")
    greedy = SamplingParams(max_tokens=16)
    solo = [token_ids(engine.submit(prompt, choice, greedy)) for prompt, choice in [*requests, late]]
    assert len({tuple(ids) for ids in solo[:5]}) == 5  # each adapter changes the base model's answer
    handles = [engine.submit(prompt, choice, greedy) for prompt, choice in requests]
    first = handles[0].next_event(timeout=120)
    late_handle = engine.submit(*late, greedy)  # joins the running batch
    assert not handles[1].done
    batched = [token_ids(handle) for handle in [*handles, late_handle]]
    batched[0].insert(0, first.token_id)
    assert batched == solo


def test_a_hundred_adapters_load_and_route_in_one_batch(bundled_pristine, tmp_path):
    model = copy.deepcopy(bundled_pristine[0])
    bank = AdapterBank(model, max_resident=100)
    for index in range(100):
        path = write_random_adapter(tmp_path / f"a{index}", model, ATTENTION, rank=4 + 4 * (index % 2), seed=index)
        bank.load(f"a{index}", path)
    memory = bank.memory_bytes()
    print(f"\n100 adapters: base {memory['base'] / 2**20:.0f} MiB, adapter slots {memory['adapters'] / 2**20:.1f} MiB")
    slot_floats = 30 * 8 * (576 + 576 + 576 + 192)  # A and B of q and v per layer, at r_max 8
    assert memory["resident"] == 100 and memory["adapters"] == 100 * slot_floats * 4
    pristine = bundled_pristine[0]
    assert memory["base"] == sum(t.numel() * t.element_size() for t in [*pristine.parameters(), *pristine.buffers()])
    tokens = torch.randint(0, 49152, (100, 4), generator=torch.Generator().manual_seed(0))
    routes = [bank.acquire(f"a{index}") for index in range(100)]
    with bank.forward_lock, torch.inference_mode():
        bank.set_routing(routes)
        fast = model(tokens).logits
        bank.stores["lora"].routing.reference = True
        reference = model(tokens).logits
        bank.set_routing([()] * 100)
        base = model(tokens).logits
    assert (fast - reference).abs().max() <= 1e-4 * reference.abs().max()  # 30 layers of fp32 rounding
    assert (fast - base).abs().amax(dim=(1, 2)).min() > 1e-2  # every row got its adapter
