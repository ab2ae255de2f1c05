"""Issue #18's probes replayed against a real server: a bad request gets its own answer, and never fails
its neighbours, holds an adapter slot, stalls the event loop, or reads a file outside the adapters directory.

A real uvicorn server runs the real engine and bank over a tiny random Llama with the bundled tokenizer
(fast). Three adapters p0, p1, p2 share two slots (--max-resident 2), so one leaked slot shows at once.
The neighbours of a bad request are running when it joins their batch (the engine is held before its
next forward until the bad request is queued), and their answers are compared with the same requests
sent alone.
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

import deltaw
from deltaw.adapters.files import CONFIG_FILE, WEIGHTS_FILE
from deltaw.serve import completions
from deltaw.serve.engine import Engine
from tests.integration.serving import API_KEY, running_server, write_random_adapters
from tests.integration.test_server_protocol import assert_openai_error

AUTH = {"Authorization": f"Bearer {API_KEY}"}
LIMIT = 256 * 2**10  # the server's --max-request-bytes
TOKENS = 96  # every answer runs this long (EOS is off), so neighbours are still running when a bad request joins
NEIGHBOURS = [("p0", "Once upon a time"), ("p1", "The weather today is"), ("tiny", "In a galaxy far away")]
SECRET = "SECRET-FIELD-OF-A-SERVER-FILE"


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """(client, engine, root): p0, p1 and p2 served with two slots; linked-config and linked-weights hold a file
    that is a link leading outside the adapters directory; corrupt has a truncated weights file."""
    root = tmp_path_factory.mktemp("abuse")
    adapters_dir = root / "adapters"
    model, tokenizer = deltaw.load_model(tiny_model_dir)
    config = deltaw.LoRAConfig(rank=4, alpha=8)
    write_random_adapters(model, adapters_dir, {name: config for name in ("p0", "p1", "p2")}, std=0.5)
    deltaw.unload(model)
    make_bad_adapters(adapters_dir, root / "outside")
    with running_server(model, tokenizer, "tiny", adapters_dir, ["p0", "p1", "p2"], max_model_len=128,
                        max_resident=2, max_request_bytes=LIMIT) as (url, engine):
        engine.eos_ids = set()
        engine.bank.wait_for_slot = 2.0  # a leaked slot is a 503 after 2 s instead of 30
        with httpx.Client(base_url=url, headers=AUTH, timeout=120) as client:
            yield client, engine, root


def make_bad_adapters(adapters_dir: Path, outside: Path) -> None:
    outside.mkdir()
    (outside / CONFIG_FILE).write_text(json.dumps({"peft_type": "LORA", "r": SECRET}))
    shutil.copy(adapters_dir / "p0" / WEIGHTS_FILE, outside / WEIGHTS_FILE)
    for name, linked in (("linked-config", CONFIG_FILE), ("linked-weights", WEIGHTS_FILE)):
        shutil.copytree(adapters_dir / "p0", adapters_dir / name)
        (adapters_dir / name / linked).unlink()
        (adapters_dir / name / linked).symlink_to(outside / linked)
    shutil.copytree(adapters_dir / "p0", adapters_dir / "corrupt")
    weights = (adapters_dir / "p0" / WEIGHTS_FILE).read_bytes()
    (adapters_dir / "corrupt" / WEIGHTS_FILE).write_bytes(weights[: len(weights) // 2])


def complete(client: httpx.Client, model: str, prompt: str, **fields) -> httpx.Response:
    return client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": TOKENS, **fields})


def text_of(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


@pytest.fixture(scope="module")
def solo(server) -> list[str]:
    """The NEIGHBOURS' greedy answers, each request sent alone."""
    client, *_ = server
    return [text_of(complete(client, model, prompt)) for model, prompt in NEIGHBOURS]


def wait_until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(12000):
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError(f"gave up waiting for {what}")


def stream_text(client: httpx.Client, model: str, prompt: str) -> str:
    """A streamed completion's text (an error payload reads "ERROR: ...")."""
    pieces = []
    body = {"model": model, "prompt": prompt, "max_tokens": TOKENS, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line.removeprefix("data: "))
                pieces.append(chunk["choices"][0]["text"] if "choices" in chunk else f"ERROR: {chunk}")
    return "".join(pieces)


def among_neighbours(client: httpx.Client, engine: Engine, monkeypatch, send: Callable[[], httpx.Response],
                     poison_rows: Callable[[list], list[int]] = lambda rows: []) -> tuple[httpx.Response, list[str]]:
    """Run `send()` while the NEIGHBOURS stream: the engine holds its first forward over all the neighbours
    until the request `send` makes is queued (or answered without reaching the engine), so that request
    joins the neighbours' batch. `poison_rows(rows)` picks rows whose logits turn NaN.

    Returns:
        (the response `send` returned, the neighbours' streamed texts).
    """
    holding, release, forward = threading.Event(), threading.Event(), engine._forward

    def held_forward(rows, *args):
        if len(rows) == len(NEIGHBOURS) and not holding.is_set():
            holding.set()
            release.wait(timeout=120)
        logits = forward(rows, *args)
        logits[poison_rows(rows)] = float("nan")
        return logits

    monkeypatch.setattr(engine, "_forward", held_forward)
    texts: list[str | None] = [None] * len(NEIGHBOURS)
    result: dict[str, httpx.Response] = {}

    def neighbour(index: int) -> None:
        texts[index] = stream_text(client, *NEIGHBOURS[index])

    threads = [threading.Thread(target=neighbour, args=(index,)) for index in range(len(NEIGHBOURS))]
    for thread in threads:
        thread.start()
    wait_until(holding.is_set, "the neighbours to share a forward")
    bad = threading.Thread(target=lambda: result.update(response=send()))
    bad.start()
    wait_until(lambda: engine.stats()["requests_waiting"] > 0 or not bad.is_alive(), "the request to be queued")
    release.set()
    for thread in [bad, *threads]:
        thread.join()
    return result["response"], texts


# ----------------------------------------------------------------------------- 1. degenerate sampling

POISONS = [  # sampling fields that used to make the engine throw for every row, and the request's own status
    ({"temperature": 1e-44}, 200),  # logits / temperature overflow to inf
    ({"temperature": 1.0, "top_p": 1e-46, "seed": 1}, 200),  # below the smallest float32: nothing was kept
    ({"model": "p0*1e30+p1", "temperature": 1.0}, 400),  # finite but absurd mix weights
]


@pytest.mark.parametrize(("poison", "status"), POISONS, ids=["temperature 1e-44", "top_p 1e-46", "weight 1e30"])
def test_a_degenerate_sampling_request_never_fails_its_neighbours(server, solo, monkeypatch, poison, status):
    client, engine, _ = server
    body = {"model": "p0", "prompt": "Hello", **poison}
    response, texts = among_neighbours(client, engine, monkeypatch, lambda: complete(client, **body))
    assert texts == solo
    assert response.status_code == status, response.text
    if status == 200:  # a temperature under the floor, or a top_p under one token's mass, is greedy
        assert text_of(response) == text_of(complete(client, "p0", "Hello"))
    else:
        assert_openai_error(response, 400, "model", "outside [-100, 100]")


def test_a_row_whose_logits_are_not_finite_fails_alone(server, solo, monkeypatch):
    client, engine, _ = server
    poisoned = engine.tokenizer("Hello")["input_ids"]

    def rows_of_the_poisoned_prompt(rows) -> list[int]:
        return [index for index, row in enumerate(rows) if row.prompt_ids == poisoned]

    response, texts = among_neighbours(client, engine, monkeypatch, lambda: complete(client, "p0", "Hello"),
                                       poison_rows=rows_of_the_poisoned_prompt)
    assert texts == solo
    error = assert_openai_error(response, 500, None, "non-finite logits")
    assert error["code"] == "generation_failed"
    assert sum(engine.bank._users) == 0


def test_the_most_stop_strings_allowed_leave_neighbours_unchanged_and_more_are_refused(server, solo, monkeypatch):
    client, engine, _ = server
    stops = [f"{index:02d}" + "~" * 254 for index in range(32)]  # 32 strings of 256 characters: the limit
    response, texts = among_neighbours(client, engine, monkeypatch,
                                       lambda: complete(client, "p0", "Hello", stop=stops))
    assert texts == solo
    assert text_of(response) == text_of(complete(client, "p0", "Hello"))  # no stop string can match
    assert_openai_error(complete(client, "p0", "Hello", stop=stops + ["x"]), 400, "stop", "at most 32 stop strings")
    assert_openai_error(complete(client, "p0", "Hello", stop=["~" * 257]), 400, "stop", "at most 256 characters")


# ----------------------------------------------------------------------------- 2. slots

def test_a_rejected_request_holds_no_adapter_slot(server):
    client, engine, _ = server
    for model in ("p0", "p1", "p0*0.5+p1*0.5"):
        response = complete(client, model, "Hello", seed=2**64, temperature=1.0)
        assert_openai_error(response, 400, "seed", "seed must be an integer in [0, 2**64)")
    text_of(complete(client, "p2", "Hello"))  # two slots: p2 needs one that p0 or p1 held
    assert client.post("/v1/adapters", json={"name": "p2"}).status_code == 200
    text_of(complete(client, "p0*0.5+p1*0.5", "Hello"))
    assert sum(engine.bank._users) == 0


# ----------------------------------------------------------------------------- 3. large bodies and prompts

def raw_exchange(client: httpx.Client, head: str, body_parts: list[bytes]) -> tuple[int, dict]:
    """Send a request head and body parts on a plain socket (a body may stay unfinished) and read the answer:
    (status, JSON body). The server closes the connection after a 413."""
    address = urlsplit(str(client.base_url))
    with socket.create_connection((address.hostname, address.port), timeout=30) as connection:
        connection.sendall(head.encode())
        for part in body_parts:
            connection.sendall(part)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            received = connection.recv(65536)
            if not received:
                break
            answer += received
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), json.loads(rest.partition(b"\r\n\r\n")[2])


HEAD = f"POST /v1/completions HTTP/1.1\r\nHost: deltaw\r\nAuthorization: Bearer {API_KEY}\r\n" \
       "Content-Type: application/json\r\n"


def test_a_body_declared_over_the_limit_is_413_before_any_of_it_is_sent(server):
    client, *_ = server
    status, body = raw_exchange(client, HEAD + f"Content-Length: {64 * 2**20}\r\n\r\n", [])
    assert status == 413 and body["error"]["code"] == "request_too_large"
    assert "67,108,864 bytes" in body["error"]["message"] and "--max-request-bytes" in body["error"]["message"]


def test_a_streamed_body_is_413_as_soon_as_it_passes_the_limit(server):
    client, *_ = server
    chunk = b"a" * (LIMIT // 2)
    parts = [f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"] * 3  # past the limit, and never finished
    status, body = raw_exchange(client, HEAD + "Transfer-Encoding: chunked\r\n\r\n", parts)
    assert status == 413 and "larger than this server's limit of 262,144 bytes" in body["error"]["message"]
    assert client.get("/health").status_code == 200


def test_health_answers_while_a_prompt_is_being_tokenized(server, monkeypatch):
    client, *_ = server
    entered, release, render = threading.Event(), threading.Event(), completions.chat_inputs

    def held_render(tokenizer, messages):  # tokenizing a long prompt, held until released
        entered.set()
        release.wait(timeout=120)
        return render(tokenizer, messages)

    monkeypatch.setattr(completions, "chat_inputs", held_render)
    result: dict[str, httpx.Response] = {}
    chat = {"model": "p1", "messages": [{"role": "user", "content": "Say something."}], "max_tokens": 4}
    sender = threading.Thread(target=lambda: result.update(response=client.post("/v1/chat/completions", json=chat)))
    sender.start()
    try:
        assert entered.wait(timeout=120)
        health = httpx.get(f"{client.base_url}/health", timeout=30)  # answered only if the event loop is free
        assert health.status_code == 200 and health.json()["status"] == "ok"
    finally:
        release.set()
        sender.join()
    assert result["response"].status_code == 200


def test_a_prompt_too_long_to_fit_is_refused_before_it_is_tokenized(server, monkeypatch):
    client, *_ = server
    calls, render = [], completions.chat_inputs
    monkeypatch.setattr(completions, "chat_inputs", lambda *args: calls.append(1) or render(*args))
    long_text = "word " * 40_000  # 200 kB: under the body limit, far past what 128 tokens can hold
    chat = {"model": "p0", "messages": [{"role": "user", "content": long_text}]}
    error = assert_openai_error(client.post("/v1/chat/completions", json=chat), 400, "messages", "shorten the prompt")
    assert "200,000 bytes" in error["message"] and calls == []
    assert_openai_error(complete(client, "p0", long_text), 400, "prompt", "more than 128 tokens")


def test_prompt_text_that_is_not_unicode_is_a_400(server):
    client, *_ = server
    chat = b'{"model": "p0", "messages": [{"role": "user", "content": "\\udfff"}]}'
    text = b'{"model": "p0", "prompt": "a \\ud800 b"}'
    for path, body in (("/v1/completions", text), ("/v1/chat/completions", chat)):
        response = client.post(path, content=body, headers={"Content-Type": "application/json"})
        assert_openai_error(response, 400, None, "lone surrogate")


# ----------------------------------------------------------------------------- 4. adapter files

@pytest.mark.parametrize("name", ["linked-config", "linked-weights"])
def test_admin_refuses_an_adapter_file_linked_outside_the_adapters_directory(server, name):
    client, _, root = server
    error = assert_openai_error(client.post("/v1/adapters", json={"name": name}), 400, "name",
                                f"{name}/{CONFIG_FILE if name == 'linked-config' else WEIGHTS_FILE}: a link")
    assert SECRET not in error["message"] and str(root) not in error["message"]
    assert name not in [card["id"] for card in client.get("/v1/models").json()["data"]]


def test_admin_errors_name_no_server_path_and_list_no_directory(server):
    client, _, root = server
    corrupt = assert_openai_error(client.post("/v1/adapters", json={"name": "corrupt"}), 400, "name",
                                  f"corrupt/{WEIGHTS_FILE}: truncated or corrupt")
    missing = assert_openai_error(client.post("/v1/adapters", json={"name": "absent"}), 404, "name",
                                  "no adapter directory 'absent'")
    for error in (corrupt, missing):
        assert str(root) not in error["message"] and "linked-config" not in error["message"]


# ----------------------------------------------------------------------------- 6. smaller

def test_an_empty_body_says_so(server):
    client, *_ = server
    response = client.post("/v1/completions", content=b"", headers={"Content-Type": "application/json"})
    error = assert_openai_error(response, 400, None, "the request body is empty")
    assert "None" not in error["message"]


def test_the_bearer_scheme_is_case_insensitive(server):
    client, *_ = server
    for scheme in ("bearer", "BEARER", "Bearer"):
        response = client.get("/v1/models", headers={"Authorization": f"{scheme} {API_KEY}"})
        assert response.status_code == 200, scheme
    assert client.get("/v1/models", headers={"Authorization": f"Basic {API_KEY}"}).status_code == 401


def test_the_api_description_is_open_as_the_readme_says(server):
    client, *_ = server
    with httpx.Client(base_url=str(client.base_url), timeout=60) as anonymous:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert anonymous.get(path).status_code == 200, path
        assert "p0" not in anonymous.get("/openapi.json").text  # the routes only, no adapter
        assert anonymous.get("/v1/models").status_code == 401
