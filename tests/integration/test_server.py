"""`deltaw serve` end to end: a real uvicorn server on the bundled model, driven by the real `openai` client.

Five random adapters (different ranks and target sets, one of them DoRA) are served, a sixth waits on disk
for the admin routes. Every adapter's greedy answer differs from the base model's, so a request silently served by
the wrong adapter, or by the base, fails these tests.
"""

from __future__ import annotations

import copy
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

import deltaw
from deltaw.models.chat import chat_inputs
from deltaw.tools.generation import generate
from deltaw.serve.engine import Engine
from tests.integration.serving import API_KEY, running_server, write_random_adapters

pytestmark = pytest.mark.slow
BASE = deltaw.BUNDLED_NAME
ADAPTERS = {
    "pirate": deltaw.LoRAConfig(rank=8, alpha=16),
    "robot": deltaw.LoRAConfig(rank=16, alpha=64, targets=[r".*\.(q|k|v|o)_proj"]),
    "poet": deltaw.LoRAConfig(rank=4, alpha=32, targets=[r".*mlp\..*"]),
    "chef": deltaw.LoRAConfig(rank=12, alpha=8, use_rslora=True),
    "sage": deltaw.LoRAConfig(rank=8, alpha=16, use_dora=True),
    "sailor": deltaw.LoRAConfig(rank=8, alpha=16),  # on disk only: loaded through POST /v1/adapters
}
SERVED = ["pirate", "robot", "poet", "chef", "sage"]
QUESTIONS = ["Say hello.", "Name a fruit."]  # every served model answers each differently (checked below)
TOKENS = 8


@dataclass
class Server:
    url: str
    engine: Engine
    client: openai.OpenAI
    admin: httpx.Client
    adapters_dir: Path


@pytest.fixture(scope="module")
def server(bundled_pristine, tmp_path_factory):
    model, tokenizer = bundled_pristine
    adapters_dir = tmp_path_factory.mktemp("serve") / "adapters"
    write_random_adapters(copy.deepcopy(model), adapters_dir, ADAPTERS, std=0.08)
    with running_server(model, tokenizer, BASE, adapters_dir, SERVED, max_model_len=512) as (url, engine):
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as admin:
            yield Server(url, engine, openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0), admin,
                         adapters_dir)


def ask(client: openai.OpenAI, model: str, question: str, stream: bool = False, **extra) -> str:
    """The greedy chat answer of `model` to `question` (concatenated deltas when streaming)."""
    messages = [{"role": "user", "content": question}]
    params = {"max_tokens": TOKENS, "temperature": 0, **extra}
    response = client.chat.completions.create(model=model, messages=messages, stream=stream, **params)
    if not stream:
        return response.choices[0].message.content
    return "".join(chunk.choices[0].delta.content or "" for chunk in response if chunk.choices)


@pytest.fixture(scope="module")
def alone(server) -> dict[tuple[str, str], str]:
    """{(model, question): answer} for every served model and question, each request sent alone."""
    return {(model, question): ask(server.client, model, question) for question in QUESTIONS
            for model in [BASE, *SERVED]}


def test_every_adapter_answers_differently_and_the_base_matches_transformers(server, alone, bundled_pristine):
    for question in QUESTIONS:
        answers = [alone[model, question] for model in [BASE, *SERVED]]
        assert len(set(answers)) == len(answers), answers
    model, tokenizer = bundled_pristine
    inputs = chat_inputs(tokenizer, [{"role": "user", "content": QUESTIONS[0]}])
    assert alone[BASE, QUESTIONS[0]] == generate(model, tokenizer, inputs, TOKENS)[0]
    pirate = copy.deepcopy(model)
    deltaw.load_adapter(pirate, server.adapters_dir / "pirate", "pirate")
    deltaw.set_adapter(pirate, "pirate")
    assert alone["pirate", QUESTIONS[0]] == generate(pirate, tokenizer, inputs, TOKENS)[0]


def test_streamed_text_equals_the_non_streamed_text(server):
    client = server.client
    for model in (BASE, "robot"):
        whole = client.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTIONS[1]}],
                                               max_tokens=TOKENS)
        chunks = list(client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": QUESTIONS[1]}], max_tokens=TOKENS, stream=True,
            stream_options={"include_usage": True}))
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
        assert streamed == whole.choices[0].message.content
        assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
        assert chunks[-1].usage.model_dump() == whole.usage.model_dump() and whole.model == model
    text = client.completions.create(model="poet", prompt="The sea is", max_tokens=TOKENS)
    streamed = client.completions.create(model="poet", prompt="The sea is", max_tokens=TOKENS, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == text.choices[0].text
    assert text.usage.completion_tokens == TOKENS or text.choices[0].finish_reason == "stop"


def test_unknown_model_is_not_found_and_lists_the_names(server):
    for model in ("parrot", "pirate*0.5+parrot*0.5"):
        with pytest.raises(openai.NotFoundError) as caught:
            ask(server.client, model, QUESTIONS[0])
        assert "parrot" in str(caught.value) and all(name in str(caught.value) for name in [BASE, *SERVED])


def test_models_lists_the_base_and_every_adapter(server):
    cards = {card.id: card for card in server.client.models.list()}
    assert set(cards) >= {BASE, *SERVED} and "sailor" not in cards
    assert cards["pirate"].owned_by == "deltaw" and cards["pirate"].model_extra["parent"] == BASE
    assert cards["robot"].model_extra["resident"] is True


def test_a_mix_works_and_differs_from_its_parts(server):
    mix = ask(server.client, "pirate*0.5+robot*0.5", QUESTIONS[1])
    assert mix not in (ask(server.client, "pirate", QUESTIONS[1]), ask(server.client, "robot", QUESTIONS[1]))


def test_admin_routes_need_the_key_and_load_pin_delete(server):
    anonymous = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.models.list()
    assert httpx.post(f"{server.url}/v1/adapters", json={"name": "sailor"}).status_code == 401
    with pytest.raises(openai.NotFoundError):
        ask(server.client, "sailor", QUESTIONS[0])
    assert server.admin.post("/v1/adapters", json={"name": "sailor"}).status_code == 200
    assert ask(server.client, "sailor", QUESTIONS[0]) != ask(server.client, BASE, QUESTIONS[0])
    assert server.admin.post("/v1/adapters/sailor/pin").json()["pinned"] is True
    assert server.admin.post("/v1/adapters", json={"name": "../sailor"}).status_code == 400
    assert server.admin.delete("/v1/adapters/sailor").json()["deleted"] is True
    with pytest.raises(openai.NotFoundError):
        ask(server.client, "sailor", QUESTIONS[0])


def test_bad_parameters_are_bad_requests_and_the_server_goes_on(server, alone):
    for bad in [{"max_tokens": 0}, {"max_tokens": -3}, {"max_completion_tokens": 0}, {"temperature": -1},
                {"top_p": 2}, {"n": 2}, {"max_tokens": 600}, {"stop": [""]}]:
        with pytest.raises(openai.BadRequestError) as caught:
            ask(server.client, "pirate", QUESTIONS[0], **bad)
        assert next(iter(bad)) in str(caught.value)
        assert BASE in [card.id for card in server.client.models.list()]
    assert ask(server.client, "pirate", QUESTIONS[0], stream=True) == alone["pirate", QUESTIONS[0]]


def test_oversized_prompt_and_invalid_json_are_bad_requests(server):
    with pytest.raises(openai.BadRequestError, match="shorten the prompt"):
        ask(server.client, BASE, "please " * 600)
    raw = server.admin.post("/v1/completions", content=b'{"model": "pirate", "prompt": ',
                            headers={"Content-Type": "application/json"})
    assert raw.status_code == 400 and "not valid JSON" in raw.json()["error"]["message"]
    assert server.admin.get("/health").json()["status"] == "ok"


def metric(text: str, name: str, labels: str = "") -> float:
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_metrics_count_requests_tokens_and_latency(server):
    before = httpx.get(f"{server.url}/metrics").text
    response = server.client.chat.completions.create(model="chef", messages=[{"role": "user", "content": "Hi"}],
                                                     max_tokens=TOKENS)
    after = httpx.get(f"{server.url}/metrics").text
    chef = '{model="chef",endpoint="chat"}'
    assert metric(after, "deltaw_requests_total", chef) == metric(before, "deltaw_requests_total", chef) + 1
    assert (metric(after, "deltaw_completion_tokens_total", '{model="chef"}')
            == metric(before, "deltaw_completion_tokens_total", '{model="chef"}') + response.usage.completion_tokens)
    for histogram in ("deltaw_request_latency_seconds_count", "deltaw_time_to_first_token_seconds_count"):
        assert metric(after, histogram) == metric(before, histogram) + 1
    assert metric(after, "deltaw_adapters_resident") >= len(SERVED)
    assert metric(after, "deltaw_requests_running") == 0


def test_a_disconnected_stream_is_cancelled(server, monkeypatch):
    handles = []
    submit = server.engine.submit
    monkeypatch.setattr(server.engine, "submit", lambda *args: handles.append(submit(*args)) or handles[-1])
    body = {"model": "pirate", "prompt": "Count: one, two, three,", "max_tokens": 400, "stream": True}
    with server.admin.stream("POST", "/v1/completions", json=body) as response:
        next(response.iter_lines())  # the first token arrived; now hang up
    completion = handles[0].result()  # without the cancel this waits for all 400 tokens, then fails below
    assert handles[0].cancelled and completion.finish_reason == "cancelled" and completion.completion_tokens < 400


def test_32_concurrent_clients_get_what_each_gets_alone(server, alone):
    """32 clients at once over 5 adapters (one DoRA) and the base, half streaming: each answer equals the one it
    got alone."""
    jobs = list(alone)  # 12 distinct (model, question) requests, each sent by 2 or 3 clients
    answers, errors = [None] * 32, []

    def client(index: int) -> None:
        try:
            answers[index] = ask(server.client, *jobs[index % len(jobs)], stream=index % 2 == 1)
        except Exception as exc:  # noqa: BLE001 - collected and reported below
            errors.append(exc)

    running, finished = [], threading.Event()

    def watch() -> None:  # how many requests share the batch, sampled while the clients run
        while not finished.wait(0.01):
            running.append(server.engine.stats()["requests_running"])

    threads = [threading.Thread(target=client, args=(index,)) for index in range(32)]
    watcher = threading.Thread(target=watch)
    watcher.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    finished.set()
    watcher.join()
    assert not errors, errors
    assert answers == [alone[jobs[index % len(jobs)]] for index in range(32)]
    assert max(running) > len(SERVED) + 1  # requests for different adapters really ran in one batch
