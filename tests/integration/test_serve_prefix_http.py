"""A prefix-tuning adapter served over HTTP next to a LoRA adapter, driven by the real `openai` client
(a tiny random Llama with the bundled tokenizer, so the test takes seconds)."""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch

import deltaw
from deltaw.adapters.prefix import PrefixConfig
from deltaw.adapters.prefix import add_prefix
from tests.integration.serving import API_KEY, running_server, write_random_adapters

SERVED = ["lora", "prefix"]
PROMPTS = ["Once upon a time", "The sea is", "Three facts about cats:", "Hello"]


@pytest.fixture(scope="module")
def client(tiny_model_dir, tmp_path_factory):
    model, tokenizer = deltaw.load_model(tiny_model_dir)
    adapters_dir = tmp_path_factory.mktemp("serve-prefix")
    write_random_adapters(copy.deepcopy(model), adapters_dir, {"lora": deltaw.LoRAConfig(rank=4, alpha=8)}, std=0.5)
    prefixed = copy.deepcopy(model)
    torch.manual_seed(7)
    add_prefix(prefixed, PrefixConfig(num_virtual_tokens=8), "prefix")
    deltaw.save_adapter(prefixed, adapters_dir / "prefix", "prefix")
    with running_server(model, tokenizer, "tiny", adapters_dir, SERVED, max_model_len=128) as (url, _):
        yield openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0)


def complete(client: openai.OpenAI, model: str, prompt: str) -> str:
    return client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0).choices[0].text


def test_prefix_and_lora_requests_served_together_equal_their_solo_answers(client):
    requests = [(model, prompt) for prompt in PROMPTS for model in ["tiny", *SERVED]]
    alone = [complete(client, model, prompt) for model, prompt in requests]
    for index in range(0, len(alone), 3):
        assert len(set(alone[index:index + 3])) == 3  # base, LoRA and prefix answer differently
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda request: complete(client, *request), requests))
    assert together == alone
    assert {model.id for model in client.models.list().data} == {"tiny", *SERVED}
    with pytest.raises(openai.BadRequestError, match="'prefix' is a prefix adapter, which cannot be part of a weighted"):
        complete(client, "prefix*0.5+lora*0.5", PROMPTS[0])
