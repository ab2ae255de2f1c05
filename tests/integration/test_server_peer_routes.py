"""Clients written for OpenAI, vLLM and llama.cpp against `deltaw serve` (a real server on a tiny random Llama):
logprobs and echo through the real `openai` client, vLLM's load/unload routes, llama.cpp's /lora-adapters and
per-request `lora` lists, with the same key and --adapters-dir confinement as deltaw's own admin routes."""

from __future__ import annotations


import httpx
import openai
import pytest

import deltaw
from tests.integration.serving import API_KEY, adapters_on_disk, running_server
from tests.integration.test_server_protocol import assert_openai_error
from tests.unit.test_logprobs import reference_logprobs

AUTH = {"Authorization": f"Bearer {API_KEY}"}
QUESTION = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """(openai client, httpx client, adapters_dir, engine, tokenizer): alpha and beta served, gamma on disk,
    'escape' a symlink leading out of the adapters directory."""
    model, tokenizer, adapters_dir = adapters_on_disk(tiny_model_dir, tmp_path_factory.mktemp("peer-routes"))
    with running_server(model, tokenizer, "tiny", adapters_dir, ["alpha", "beta"], max_model_len=96) as (url, engine):
        engine.eos_ids = set()  # exact lengths
        with httpx.Client(base_url=url, headers=AUTH, timeout=60) as http:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0)
            yield client, http, adapters_dir, engine, tokenizer


# --------------------------------------------------------------------------------------------- logprobs
def test_chat_logprobs_through_the_openai_client(server):
    client, _, _, engine, tokenizer = server
    answer = client.chat.completions.create(model="alpha", messages=QUESTION, max_tokens=5, logprobs=True,
                                            top_logprobs=3)
    content = answer.choices[0].logprobs.content
    assert len(content) == 5 and "".join(item.token for item in content) == answer.choices[0].message.content
    for item in content:
        assert len(item.top_logprobs) == 3 and item.top_logprobs[0].logprob >= item.logprob
        assert bytes(item.bytes).decode() == item.token
    prompt = deltaw.models.chat.chat_inputs(tokenizer, QUESTION)["input_ids"][0].tolist()
    tokens = tokenizer(answer.choices[0].message.content, add_special_tokens=False)["input_ids"]
    reference = reference_logprobs(engine, prompt + tokens, [], "alpha")
    assert content[0].logprob == pytest.approx(reference[len(prompt) - 1, tokens[0]].item(), abs=1e-4)

    streamed = client.chat.completions.create(model="alpha", messages=QUESTION, max_tokens=5, logprobs=True,
                                              top_logprobs=3, stream=True)
    pieces = [item for chunk in streamed if chunk.choices and chunk.choices[0].logprobs
              for item in chunk.choices[0].logprobs.content]
    assert [(p.token, round(p.logprob, 5)) for p in pieces] == [(c.token, round(c.logprob, 5)) for c in content]

    plain = client.chat.completions.create(model="alpha", messages=QUESTION, max_tokens=5)
    assert plain.choices[0].logprobs is None


def test_completion_logprobs_and_echo_equal_a_plain_forward(server):
    client, _, _, engine, tokenizer = server
    ids = tokenizer("The quick brown fox jumps over", add_special_tokens=False)["input_ids"]
    answer = client.completions.create(model="beta", prompt=[ids], max_tokens=3, logprobs=2, echo=True)
    choice = answer.choices[0]
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(ids) + 3 and logprobs.token_logprobs[0] is None
    assert choice.text.startswith(tokenizer.decode(ids))
    generated = tokenizer(choice.text[len(tokenizer.decode(ids)):], add_special_tokens=False)["input_ids"]
    reference = reference_logprobs(engine, ids + generated, [], "beta")
    for position in range(1, len(ids) + 3):
        token = (ids + generated)[position]
        assert logprobs.token_logprobs[position] == pytest.approx(reference[position - 1, token].item(), abs=1e-4)
        assert len(logprobs.top_logprobs[position]) in (2, 3)  # the top 2, and the chosen token if not among them
    assert logprobs.text_offset == sorted(logprobs.text_offset)

    text = client.completions.create(model="beta", prompt="The quick brown fox", max_tokens=3, logprobs=0)
    assert len(text.choices[0].logprobs.tokens) == 3 and not text.choices[0].text.startswith("The quick")
    streamed = list(client.completions.create(model="beta", prompt="The quick brown fox", max_tokens=3, echo=True,
                                              stream=True))
    assert streamed[0].choices[0].text == "The quick brown fox"


# --------------------------------------------------------------------------------------------- vLLM
def test_vllm_load_and_unload_routes(server):
    client, http, adapters_dir, _, _ = server
    response = http.post("/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": str(adapters_dir / "gamma")})
    assert response.status_code == 200 and response.text == "Success: LoRA adapter 'sql' added successfully."
    assert client.chat.completions.create(model="sql", messages=QUESTION, max_tokens=2).choices[0].message.content
    assert_openai_error(http.post("/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": "gamma"}), 400,
                        "lora_name", "has already been loaded")
    in_place = http.post("/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": "gamma", "load_inplace": True})
    assert in_place.status_code == 200
    response = http.post("/v1/unload_lora_adapter", json={"lora_name": "sql"})
    assert response.status_code == 200 and response.text == "Success: LoRA adapter 'sql' removed successfully."
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="sql", messages=QUESTION, max_tokens=2)
    assert_openai_error(http.post("/v1/unload_lora_adapter", json={"lora_name": "sql"}), 404, "lora_name", "sql")


@pytest.mark.parametrize(("body", "status", "param", "fragment"), [
    ({"lora_name": "x", "lora_path": "escape"}, 400, "lora_path", "outside the adapters directory"),
    ({"lora_name": "x", "lora_path": "../outside/escape"}, 400, "lora_path", "outside the adapters directory"),
    ({"lora_name": "x", "lora_path": "/etc"}, 400, "lora_path", "outside the adapters directory"),
    ({"lora_name": "x", "lora_path": "nothing-here"}, 404, "lora_path", "no adapter directory"),
    ({"lora_name": "tiny", "lora_path": "gamma"}, 400, "lora_name", "is the base model"),
    ({"lora_name": "../x", "lora_path": "gamma"}, 400, "lora_name", "invalid adapter name"),
    ({"lora_name": "x"}, 400, "lora_path", "missing required field"),
])
def test_vllm_load_refuses_bad_requests(server, body, status, param, fragment):
    _, http, _, _, _ = server
    assert_openai_error(http.post("/v1/load_lora_adapter", json=body), status, param, fragment)
    assert "x" not in http.get("/health").json()["adapters"]


def test_peer_admin_routes_need_the_key(server):
    _, http, _, _, _ = server
    for method, path, body in [("POST", "/v1/load_lora_adapter", {"lora_name": "g", "lora_path": "gamma"}),
                               ("POST", "/v1/unload_lora_adapter", {"lora_name": "alpha"}),
                               ("GET", "/lora-adapters", None), ("POST", "/lora-adapters", [])]:
        response = httpx.request(method, f"{http.base_url}{path}", json=body)
        assert response.status_code == 401, path
    assert http.get("/health").json()["adapters"] == ["alpha", "beta"]


# --------------------------------------------------------------------------------------------- llama.cpp
def greedy(client: openai.OpenAI, model: str, **extra) -> str:
    answer = client.completions.create(model=model, prompt="Once upon a time", max_tokens=6, extra_body=extra)
    return answer.choices[0].text


def test_llamacpp_adapter_list_and_per_request_lora(server):
    client, http, adapters_dir, _, _ = server
    listed = http.get("/lora-adapters").json()
    assert [(item["id"], item["name"], item["scale"]) for item in listed] == [(0, "alpha", 0.0), (1, "beta", 0.0)]
    assert listed[0]["path"] == str(adapters_dir / "alpha") and listed[0]["task_name"] == ""
    base, alpha = greedy(client, "tiny"), greedy(client, "alpha")
    assert alpha != base
    assert greedy(client, "tiny", lora=[{"id": 0, "scale": 1.0}]) == alpha
    assert greedy(client, "tiny", lora=[{"id": 0, "scale": 0.0}]) == base
    assert greedy(client, "tiny", lora=[{"id": 0, "scale": 0.5}, {"id": 1, "scale": 0.25}]) == greedy(
        client, "alpha*0.5+beta*0.25")


def test_llamacpp_server_wide_scales(server):
    client, http, _, _, _ = server
    base, beta = greedy(client, "tiny"), greedy(client, "beta")
    try:
        listed = http.get("/lora-adapters").json()  # sent back as listed, as llama.cpp clients may do
        assert http.post("/lora-adapters", json=[{**listed[1], "scale": 1.0}]).json() == {"success": True}
        assert [item["scale"] for item in http.get("/lora-adapters").json()] == [0.0, 1.0]
        assert greedy(client, "tiny") == beta  # the base model's name now runs the server-wide mix
        assert greedy(client, "tiny", lora=[{"id": 1, "scale": 0.0}]) == base  # a request's own list wins
        assert greedy(client, "alpha") == greedy(client, "alpha", lora=[])  # an adapter by name is unaffected
    finally:
        http.post("/lora-adapters", json=[])
    assert greedy(client, "tiny") == base


@pytest.mark.parametrize(("body", "fragment"), [
    ({"id": 0, "scale": 1.0}, "Request body must be an array"),
    ([{"id": 7, "scale": 1.0}], "no adapter has id 7; the served ids (GET /lora-adapters) are: 0 (alpha), 1 (beta)"),
    ([{"id": 0}], "must be an array of objects with 'id' and 'scale'"),
    ([{"id": 0, "scale": "high"}], "must be an array of objects with 'id' and 'scale'"),
])
def test_llamacpp_bad_scale_lists_are_refused(server, body, fragment):
    _, http, _, _, _ = server
    assert_openai_error(http.post("/lora-adapters", json=body), 400, None, fragment)
    assert [item["scale"] for item in http.get("/lora-adapters").json()] == [0.0, 0.0]


@pytest.mark.parametrize("scale", [1e30, -100.5])
def test_llamacpp_scales_are_bounded_as_mix_weights(server, scale):
    _, http, _, _, _ = server
    response = http.post("/lora-adapters", json=[{"id": 0, "scale": 0.5}, {"id": 1, "scale": scale}])
    assert_openai_error(response, 400, "1.scale", f"1.scale: {scale:g} is outside [-100, 100]")
    assert [item["scale"] for item in http.get("/lora-adapters").json()] == [0.0, 0.0]
    assert http.post("/lora-adapters", json=[{"id": 1, "scale": -100}]).json() == {"success": True}  # the bound
    http.post("/lora-adapters", json=[])
