"""The HTTP layer of `deltaw serve` on a tiny random model (fast): errors, auth, SSE framing, admin paths.

A real uvicorn server runs the real engine and bank over a 2-layer Llama with the bundled tokenizer;
the bundled-model behaviour (personas, concurrency, the openai client) is in test_server.py.
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.integration.serving import API_KEY, adapters_on_disk, running_server

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHAT = {"model": "alpha", "messages": [{"role": "user", "content": "Say something."}], "max_tokens": 4}


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """(client, adapters_dir, engine): alpha and beta served; gamma on disk only; 'escape' a symlink leading out."""
    model, tokenizer, adapters_dir = adapters_on_disk(tiny_model_dir, tmp_path_factory.mktemp("protocol"))
    with running_server(model, tokenizer, "tiny", adapters_dir, ["alpha", "beta"], max_model_len=64) as (url, engine):
        with httpx.Client(base_url=url, headers=AUTH, timeout=60) as client:
            yield client, adapters_dir, engine


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None, fragment: str = "") -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert fragment.lower() in error["message"].lower(), error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


def assert_still_serving(client: httpx.Client) -> None:
    assert client.get("/health").json()["status"] == "ok"
    response = client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["role"] == "assistant"


BAD_CHAT = [
    ({"messages": CHAT["messages"]}, "model", "missing required field 'model'"),
    ({"model": "alpha"}, "messages", "missing required field 'messages'"),
    ({**CHAT, "messages": []}, "messages", "at least 1"),
    ({**CHAT, "messages": "hello"}, "messages", "valid list"),
    ({**CHAT, "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role", "'system'"),
    ({**CHAT, "messages": [{"role": "user"}]}, "messages.0.content", "missing"),
    ({**CHAT, "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({**CHAT, "max_tokens": -5}, "max_tokens", "greater than or equal to 1"),
    ({**CHAT, "max_tokens": "ten"}, "max_tokens", "valid integer"),
    ({**CHAT, "max_completion_tokens": 0}, "max_completion_tokens", "greater than or equal to 1"),
    ({**CHAT, "temperature": -0.5}, "temperature", "greater than or equal to 0"),
    ({**CHAT, "top_p": 0}, "top_p", "greater than 0"),
    ({**CHAT, "top_p": 1.5}, "top_p", "less than or equal to 1"),
    ({**CHAT, "n": 2}, "n", "only n=1"),
    ({**CHAT, "stop": [""]}, "stop", "non-empty"),
    ({**CHAT, "frequency_penalty": 0.5}, None, "'frequency_penalty' is not supported"),
    ({**CHAT, "top_logprobs": 2}, None, "'top_logprobs' needs 'logprobs': true"),
    ({**CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "less than or equal to 20"),
    ({**CHAT, "lora": {"id": 0, "scale": 1}}, "lora", "'lora' must be an array of objects with 'id' and 'scale'"),
    ({**CHAT, "lora": [{"id": 0}]}, "lora.0.scale", "missing"),
    ({**CHAT, "model": "tiny", "lora": [{"id": 0, "scale": 1e30}]}, "lora.0.scale", "1e+30 is outside [-100, 100]"),
    ({**CHAT, "model": "tiny", "lora": [{"id": 9, "scale": 1.0}]}, "lora", "no adapter has id 9"),
    ({**CHAT, "lora": [{"id": 0, "scale": 1.0}]}, "lora", "set 'model' to the base model's name"),
    ({**CHAT, "stream": "yes please"}, "stream", "valid boolean"),
    ({**CHAT, "seed": -1}, "seed", "seed must be an integer in [0, 2**64)"),
    ({**CHAT, "seed": 2**64}, "seed", "seed must be an integer in [0, 2**64)"),
    ({**CHAT, "stop": ["x"] * 33}, "stop", "at most 32 stop strings"),
    ({**CHAT, "max_tokens": 1000}, None, "exceeds the model length limit of 64"),
    ({**CHAT, "messages": [{"role": "user", "content": "word " * 200}]}, None, "shorten the prompt"),
    ({**CHAT, "model": "alpha*x+beta"}, "model", "not a finite number"),
    ({**CHAT, "model": "../alpha"}, None, "not served here"),
]


@pytest.mark.parametrize(("body", "param", "fragment"), BAD_CHAT, ids=[f[2][:30] for f in BAD_CHAT])
def test_bad_chat_requests_are_400_with_openai_errors(server, body, param, fragment):
    client, *_ = server
    status = 404 if "not served" in fragment else 400
    assert_openai_error(client.post("/v1/chat/completions", json=body), status, param, fragment)
    assert_still_serving(client)


BAD_COMPLETIONS = [
    ({"model": "alpha"}, "prompt", "missing required field 'prompt'"),
    ({"model": "alpha", "prompt": ""}, "prompt", "the prompt is empty"),
    ({"model": "alpha", "prompt": ["one", "two"]}, "prompt", "one prompt per request"),
    ({"model": "alpha", "prompt": [1, 2, 10**9]}, None, "token ids must be integers in [0,"),
    ({"model": "alpha", "prompt": "hi", "max_tokens": -1}, "max_tokens", "greater than or equal to 1"),
]


@pytest.mark.parametrize(("body", "param", "fragment"), BAD_COMPLETIONS, ids=[f[2][:30] for f in BAD_COMPLETIONS])
def test_bad_completion_requests_are_400(server, body, param, fragment):
    client, *_ = server
    assert_openai_error(client.post("/v1/completions", json=body), 400, param, fragment)
    assert_still_serving(client)


@pytest.mark.parametrize("raw", [b'{"model": "alpha", "messages": [', b"not json at all", b"", b"[1, 2]", b'"text"'])
def test_invalid_json_is_400(server, raw):
    client, *_ = server
    response = client.post("/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})
    assert_openai_error(response, 400)
    assert_still_serving(client)


def test_unknown_model_is_404_listing_every_served_name(server):
    client, *_ = server
    error = assert_openai_error(client.post("/v1/chat/completions", json={**CHAT, "model": "pirate"}), 404, "model")
    assert error["code"] == "model_not_found"
    for name in ("tiny", "alpha", "beta"):
        assert name in error["message"]
    assert_openai_error(client.post("/v1/completions", json={"model": "alpha*0.5+nobody*0.5", "prompt": "x"}), 404,
                        "model", "'nobody'")
    assert_openai_error(client.get("/v1/no-such-route"), 404, None, "not found")


def test_api_key_guards_every_v1_route_but_not_health_or_metrics(server):
    client, *_ = server
    with httpx.Client(base_url=str(client.base_url), timeout=60) as anonymous:
        for method, path, body in [("GET", "/v1/models", None), ("POST", "/v1/chat/completions", CHAT),
                                   ("POST", "/v1/completions", {"model": "alpha", "prompt": "x"}),
                                   ("POST", "/v1/adapters", {"name": "gamma"}), ("DELETE", "/v1/adapters/alpha", None),
                                   ("POST", "/v1/adapters/alpha/pin", None)]:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
                response = anonymous.request(method, path, json=body, headers=headers)
                assert_openai_error(response, 401, None, "API key")
        bad_json = anonymous.post("/v1/chat/completions", content=b"{", headers={"Content-Type": "application/json"})
        assert bad_json.status_code == 401  # the key is checked before the body is read
        assert anonymous.get("/health").status_code == 200
        assert anonymous.get("/metrics").status_code == 200
    assert "alpha" in [card["id"] for card in client.get("/v1/models").json()["data"]]  # nothing was unloaded


def sse_payloads(response: httpx.Response) -> list[str]:
    """The `data:` payloads of an SSE body, checking each event is one `data:` line and a blank line."""
    assert response.headers["content-type"].startswith("text/event-stream")
    events = response.text.split("\n\n")
    assert events[-1] == ""
    assert all(event.startswith("data: ") and "\n" not in event for event in events[:-1])
    return [event.removeprefix("data: ") for event in events[:-1]]


def test_chat_stream_framing_and_text_equal_the_non_streamed_answer(server):
    client, *_ = server
    body = {**CHAT, "max_tokens": 12}
    whole = client.post("/v1/chat/completions", json=body).json()
    payloads = sse_payloads(client.post("/v1/chat/completions",
                                        json={**body, "stream": True, "stream_options": {"include_usage": True}}))
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(payload) for payload in payloads[:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" and chunk["id"] == chunks[0]["id"] for chunk in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks[:-1])
    assert text == whole["choices"][0]["message"]["content"] and text
    assert chunks[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert all(chunk["choices"][0]["finish_reason"] is None for chunk in chunks[:-2])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    assert whole["usage"]["completion_tokens"] <= 12 and whole["object"] == "chat.completion"


def test_completion_stream_without_usage(server, tokenizer):
    client, *_ = server
    body = {"model": "beta", "prompt": "Once upon a time", "max_tokens": 6}
    whole = client.post("/v1/completions", json=body).json()
    payloads = sse_payloads(client.post("/v1/completions", json={**body, "stream": True}))
    chunks = [json.loads(payload) for payload in payloads[:-1]]
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == whole["choices"][0]["text"]
    assert all(chunk["usage"] is None and chunk["object"] == "text_completion" for chunk in chunks)
    prompt_tokens, completion_tokens = len(tokenizer(body["prompt"])["input_ids"]), whole["usage"]["completion_tokens"]
    assert whole["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                              "total_tokens": prompt_tokens + completion_tokens}
    assert completion_tokens == 6 or whole["choices"][0]["finish_reason"] == "stop"


def test_admin_refuses_paths_outside_the_adapters_directory(server):
    client, adapters_dir, _ = server
    for name in ("../alpha", "/etc", str(adapters_dir / "gamma"), "gamma/../alpha", "a.b"):
        assert_openai_error(client.post("/v1/adapters", json={"name": name}), 400, "name", "invalid adapter name")
    assert_openai_error(client.post("/v1/adapters", json={"name": "escape"}), 400, "name", "outside the adapters")
    error = assert_openai_error(client.post("/v1/adapters", json={"name": "missing"}), 404, "name", "'missing'")
    assert "gamma" not in error["message"] and str(adapters_dir) not in error["message"]  # no listing, no path
    assert_openai_error(client.post("/v1/adapters", json={"name": "gamma", "path": "/etc"}), 400, "path")
    assert_openai_error(client.post("/v1/adapters", json={"name": "tiny"}), 400, "name", "base model")
    served = [card["id"] for card in client.get("/v1/models").json()["data"]]
    assert "escape" not in served and "missing" not in served


def test_admin_load_pin_unpin_delete(server):
    client, *_ = server
    assert_openai_error(client.post("/v1/chat/completions", json={**CHAT, "model": "gamma"}), 404, "model")
    card = client.post("/v1/adapters", json={"name": "gamma", "pin": True}).json()
    assert card["id"] == "gamma" and card["pinned"] and card["resident"] and card["parent"] == "tiny"
    assert client.post("/v1/chat/completions", json={**CHAT, "model": "gamma"}).status_code == 200
    assert client.post("/v1/adapters/gamma/unpin").json()["pinned"] is False
    assert client.post("/v1/adapters/gamma/pin").json()["pinned"] is True
    assert client.delete("/v1/adapters/gamma").json() == {"id": "gamma", "object": "model", "deleted": True}
    assert_openai_error(client.post("/v1/chat/completions", json={**CHAT, "model": "gamma"}), 404, "model")
    assert_openai_error(client.delete("/v1/adapters/gamma"), 404, "name", "no adapter named 'gamma'")
    assert_openai_error(client.post("/v1/adapters/gamma/pin"), 404, "name")
    assert_openai_error(client.delete("/v1/adapters/tiny"), 400, "name", "base model")
    assert "gamma" not in [card["id"] for card in client.get("/v1/models").json()["data"]]


def test_a_generation_that_fails_in_the_engine_is_a_500_for_it_alone(server, monkeypatch):
    client, _, engine = server
    forward = engine.model.forward
    calls, failing = [], [1]

    def fail_once(*args, **kwargs):  # forward number `failing[0]` fails: 1 is a prefill, 2 a decode step
        calls.append(1)
        if len(calls) == failing[0]:
            raise RuntimeError("simulated device failure")
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine.model, "forward", fail_once)
    error = assert_openai_error(client.post("/v1/chat/completions", json=CHAT), 500, None, "simulated device failure")
    assert error["type"] == "server_error"
    calls.clear()
    failing[0] = 2
    payloads = sse_payloads(client.post("/v1/chat/completions", json={**CHAT, "stream": True}))
    assert "simulated device failure" in json.loads(payloads[-2])["error"]["message"] and payloads[-1] == "[DONE]"
    assert_still_serving(client)


def test_stop_strings_seeds_and_text_parts_reach_the_engine(server):
    client, *_ = server
    body = {"model": "beta", "prompt": "Once upon a time", "max_tokens": 12}
    free = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    stop = free[len(free) // 2 : len(free) // 2 + 2]
    stopped = client.post("/v1/completions", json={**body, "stop": stop}).json()["choices"][0]
    assert stopped["text"] == free[: free.index(stop)] and stopped["finish_reason"] == "stop"
    streamed = sse_payloads(client.post("/v1/completions", json={**body, "stop": [stop], "stream": True}))
    assert "".join(json.loads(p)["choices"][0]["text"] for p in streamed[:-1]) == stopped["text"]

    sampled = {**CHAT, "max_tokens": 8, "temperature": 1.0, "top_p": 0.9, "seed": 7}
    first, second = (client.post("/v1/chat/completions", json=sampled).json() for _ in range(2))
    assert first["choices"] == second["choices"]
    assert client.post("/v1/chat/completions", json={**sampled, "seed": 8}).json()["choices"] != first["choices"]
    parts = {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "Say "},
                                                                {"type": "text", "text": "something."}]}]}
    assert client.post("/v1/chat/completions", json=parts).json()["choices"] == \
        client.post("/v1/chat/completions", json=CHAT).json()["choices"]
