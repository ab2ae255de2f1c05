"""DoRA, LoRA, embedding-LoRA and trainable-token adapters served over HTTP in one batch with base requests, driven by
the real `openai` client (a tiny random Llama with the bundled tokenizer, so the test takes seconds)."""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch

import deltaw
from deltaw.tools.generation import generate
from tests.integration.serving import API_KEY, running_server

PROMPTS = ["Once upon a time", "The sea is", "Three facts about cats:", "Hello"]
SERVED = ["dora", "lora", "embedding", "tokens"]


def adapters(tokenizer) -> dict[str, deltaw.LoRAConfig]:
    prompt_ids = sorted({token for prompt in PROMPTS for token in tokenizer(prompt)["input_ids"]})
    return {
        "dora": deltaw.LoRAConfig(rank=4, alpha=8, use_dora=True),
        "lora": deltaw.LoRAConfig(rank=4, alpha=8),
        "embedding": deltaw.LoRAConfig(rank=4, alpha=8, targets=[r".*embed_tokens", r".*q_proj"]),
        "tokens": deltaw.LoRAConfig(rank=2, alpha=4, targets=[r".*o_proj"], trainable_tokens=prompt_ids),
    }


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    model, tokenizer = deltaw.load_model(tiny_model_dir)
    adapters_dir = tmp_path_factory.mktemp("serve-dora")
    for seed, (name, config) in enumerate(adapters(tokenizer).items(), start=1):
        trained = copy.deepcopy(model)
        torch.manual_seed(seed)
        deltaw.add_lora(trained, config, name)
        generator = torch.Generator().manual_seed(seed)
        for key, param in trained.named_parameters():
            if param.requires_grad:
                param.data += torch.randn(param.shape, generator=generator) * 0.5
        deltaw.save_adapter(trained, adapters_dir / name, name)
    with running_server(model, tokenizer, "tiny", adapters_dir, SERVED, max_model_len=128) as (url, _):
        yield openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0), model, tokenizer, adapters_dir


def complete(client: openai.OpenAI, model: str, prompt: str) -> str:
    return client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0).choices[0].text


def test_dora_lora_embedding_token_and_base_requests_together_equal_their_solo_answers(served):
    client = served[0]
    requests = [(model, prompt) for prompt in PROMPTS for model in ["tiny", *SERVED]]
    alone = [complete(client, model, prompt) for model, prompt in requests]
    width = len(SERVED) + 1
    for index in range(0, len(alone), width):
        assert len(set(alone[index:index + width])) == width, alone[index:index + width]  # all answer differently
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda request: complete(client, *request), requests))
    assert together == alone


def test_served_dora_answer_equals_the_adapter_on_the_model_itself(served):
    client, model, tokenizer, adapters_dir = served
    for name in ("dora", "tokens"):
        local = copy.deepcopy(model)
        deltaw.load_adapter(local, adapters_dir / name, name)
        deltaw.set_adapter(local, name)
        inputs = tokenizer(PROMPTS[0], return_tensors="pt")
        assert complete(client, name, PROMPTS[0]) == generate(local, tokenizer, inputs, 8)[0]


def test_weighted_mixes_of_dora_and_other_adapters_are_served(served):
    client = served[0]
    mix = complete(client, "dora*0.5+lora*0.5", PROMPTS[1])
    assert mix not in (complete(client, "dora", PROMPTS[1]), complete(client, "lora", PROMPTS[1]))
    assert complete(client, "dora*1.0", PROMPTS[1]) == complete(client, "dora", PROMPTS[1])
