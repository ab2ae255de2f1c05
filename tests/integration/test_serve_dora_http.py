"""DoRA, LoRA, embedding-LoRA and trainable-token adapters served over HTTP in one batch with base requests, driven by
the real `openai` client (a tiny random Llama with the bundled tokenizer, so the test takes seconds): alone, in
weighted mixes named in `model` or listed in llama.cpp's `lora` field, and with echoed logprobs; a prefix adapter
served beside them has no llama.cpp id."""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

import deltaw
from deltaw.adapters.prefix import PrefixConfig, add_prefix
from deltaw.tools.generation import generate
from tests.integration.serving import API_KEY, running_server
from tests.integration.test_server_protocol import assert_openai_error

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
    prefixed = copy.deepcopy(model)
    add_prefix(prefixed, PrefixConfig(num_virtual_tokens=4), "prefix")
    deltaw.save_adapter(prefixed, adapters_dir / "prefix", "prefix")
    with running_server(model, tokenizer, "tiny", adapters_dir, [*SERVED, "prefix"], max_model_len=128) as (url, _):
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as http:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0)
            yield client, model, tokenizer, adapters_dir, http


def complete(client: openai.OpenAI, model: str, prompt: str, **extra) -> str:
    answer = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0, extra_body=extra)
    return answer.choices[0].text


def chat(client: openai.OpenAI, model: str, **extra) -> str:
    answer = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPTS[2]}],
                                            max_tokens=8, temperature=0, extra_body=extra)
    return answer.choices[0].message.content


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
    client, model, tokenizer, adapters_dir, _ = served
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


def llamacpp_ids(http: httpx.Client) -> dict[str, int]:
    return {entry["name"]: entry["id"] for entry in http.get("/lora-adapters").json()}


def test_a_llamacpp_lora_list_of_dora_embedding_and_token_adapters_equals_the_mix_named_in_model(served):
    client, http = served[0], served[4]
    ids = llamacpp_ids(http)
    scales = {"dora": 0.5, "embedding": 0.7, "tokens": 0.6}
    lora = [{"id": ids[name], "scale": scale} for name, scale in scales.items()]
    named = "+".join(f"{name}*{scale}" for name, scale in scales.items())
    answer = complete(client, "tiny", PROMPTS[2], lora=lora)
    assert answer == complete(client, named, PROMPTS[2])
    others = [complete(client, mix, PROMPTS[2]) for mix in ("tiny", "dora*0.5+embedding*0.7", "dora*0.5+tokens*0.6",
                                                              "embedding*0.7+tokens*0.6")]
    assert answer not in others  # every member counts
    assert chat(client, "tiny", lora=lora) == chat(client, named) != chat(client, "tiny")  # the chat endpoint too


@pytest.mark.parametrize("name", ["dora", "embedding", "tokens"])
def test_echoed_logprobs_of_dora_embedding_and_token_adapters_equal_a_plain_forward(served, name):
    client, model, tokenizer, adapters_dir, _ = served
    ids = tokenizer(PROMPTS[2], add_special_tokens=False)["input_ids"]
    answer = client.completions.create(model=name, prompt=[ids], max_tokens=1, temperature=0, logprobs=1, echo=True)
    logprobs = answer.choices[0].logprobs.token_logprobs
    local = copy.deepcopy(model)
    deltaw.load_adapter(local, adapters_dir / name, name)
    deltaw.set_adapter(local, name)
    expected = {}
    for which, forward in [("adapter", local), ("base", model)]:
        with torch.no_grad():
            rows = torch.log_softmax(forward(torch.tensor([ids])).logits[0].float(), dim=-1)
        expected[which] = [rows[i - 1, ids[i]].item() for i in range(1, len(ids))] + [rows[-1].max().item()]
    assert logprobs[0] is None and logprobs[1:] == pytest.approx(expected["adapter"], abs=1e-4)
    assert logprobs[1:] != pytest.approx(expected["base"], abs=1e-2)  # the adapter matters


def test_a_prefix_adapter_has_no_llamacpp_id(served):
    client, http = served[0], served[4]
    ids = llamacpp_ids(http)
    assert sorted(ids) == sorted(SERVED)  # listed: what a lora list can hold; the prefix adapter is used by name
    unlisted = max(ids.values()) + 1
    with pytest.raises(openai.BadRequestError, match=r"no adapter has id .*a prefix adapter has no id: name it in"):
        complete(client, "tiny", PROMPTS[0], lora=[{"id": unlisted, "scale": 1.0}])
    assert_openai_error(http.post("/lora-adapters", json=[{"id": unlisted, "scale": 1.0}]), 400, None,
                        "a prefix adapter has no id")
    assert complete(client, "prefix", PROMPTS[0]) != complete(client, "tiny", PROMPTS[0])
    with pytest.raises(openai.BadRequestError, match="set 'model' to the base model"):
        complete(client, "prefix", PROMPTS[0], lora=[{"id": ids["dora"], "scale": 1.0}])
