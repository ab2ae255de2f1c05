"""Serving under abuse: how long a bad request takes to be refused, and what it costs everyone else,
on the bundled SmolLM2-135M behind a real uvicorn server (the probes of issue #18).

1. Oversized prompts and bodies (chat requests with a 1 MB, 5 MB and 20 MB message, a 64 MB body
   sent with its Content-Length): seconds until the answer, its status, and the slowest GET /health
   answered while it was being handled (/health polled every 20 ms).
2. Stop strings: a neighbour's greedy 32-token request alone, beside 8 decoding requests without stop
   strings, and beside 8 with the most stop strings allowed (32 of 256 characters); the three alternate
   within each round; medians, and the ratio. Then the stop check's own cost per token.

Run it on a tree without the limits too (`PYTHONPATH=/work/main/src`) to see the "before" column.

    .venv/bin/python bench/serve_abuse.py [--rounds 3] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import inspect
import statistics
import tempfile
import threading
import time
import warnings
from pathlib import Path

import httpx
import torch

import deltaw
from deltaw.serve import AdapterBank, Engine
from deltaw.serve.app import BackgroundServer, create_app
from deltaw.serve.sampling import TextStream

warnings.filterwarnings("ignore")
CHAT = "/v1/chat/completions"


def start_server(directory: Path):
    """A started engine and app over the bundled model with three random r=8 adapters p0, p1, p2."""
    model, tokenizer = deltaw.load_model(deltaw.BUNDLED_NAME)
    trained = copy.deepcopy(model)
    for seed, name in enumerate(("p0", "p1", "p2")):
        torch.manual_seed(seed)
        deltaw.add_lora(trained, deltaw.LoRAConfig(rank=8, alpha=16), name=name)
        deltaw.save_adapter(trained, directory / name, name)
    bank = AdapterBank(model, max_resident=4, adapters_dir=directory)
    for name in ("p0", "p1", "p2"):
        bank.load(name, directory / name)
    engine = Engine(model, tokenizer, bank, max_batch_size=16, max_model_len=2048)
    engine.start()
    return engine, create_app(engine, bank, tokenizer, deltaw.BUNDLED_NAME)


def with_health_polled(url: str, action) -> tuple[object, float, str]:
    """(action's result, its seconds, the slowest /health answer while it ran: seconds, or "-" if none came)."""
    done, answered = threading.Event(), []

    def poll() -> None:
        with httpx.Client(timeout=120) as client:
            while not done.is_set():
                start = time.perf_counter()
                client.get(f"{url}/health")
                answered.append(time.perf_counter() - start)
                time.sleep(0.02)

    poller = threading.Thread(target=poll)
    poller.start()
    start = time.perf_counter()
    try:
        result = action()
    finally:
        seconds = time.perf_counter() - start
        done.set()
        poller.join()
    return result, seconds, f"{max(answered):.3f}" if answered else "-"


def oversized(url: str) -> list[tuple[str, str, float, str]]:
    rows = []
    with httpx.Client(base_url=url, timeout=600) as client:
        for label, size in (("chat, 1 MB message", 2**20), ("chat, 5 MB message", 5 * 2**20),
                            ("chat, 20 MB message", 20 * 2**20)):
            body = {"model": "p0", "messages": [{"role": "user", "content": "word " * (size // 5)}], "max_tokens": 4}
            response, seconds, slowest = with_health_polled(url, lambda: client.post(CHAT, json=body))
            rows.append((label, str(response.status_code), seconds, slowest))
        raw = b'{"model": "p0", "prompt": "' + b"a" * (64 * 2**20) + b'"}'

        def send_raw():
            try:
                return client.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"},
                                   timeout=60).status_code
            except httpx.HTTPError as exc:
                return type(exc).__name__
        status, seconds, slowest = with_health_polled(url, send_raw)
        rows.append(("64 MB body (Content-Length)", str(status), seconds, slowest))
    return rows


def neighbour_seconds(url: str, loud: int, stops: list[str]) -> float:
    """Seconds of a 32-token greedy request sent while `loud` requests with `stops` are decoding."""
    body = {"model": "p1", "messages": [{"role": "user", "content": "Name three rivers."}], "max_tokens": 32}
    noisy = {"model": "p0", "messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 96,
             "stop": stops}
    with httpx.Client(base_url=url, timeout=600) as client:
        threads = [threading.Thread(target=client.post, args=(CHAT,), kwargs={"json": noisy}) for _ in range(loud)]
        for thread in threads:
            thread.start()
        if loud:
            time.sleep(1.0)  # the loud requests are decoding when the neighbour arrives
        start = time.perf_counter()
        assert client.post(CHAT, json=body).status_code == 200
        seconds = time.perf_counter() - start
        for thread in threads:
            thread.join()
    return seconds


def stop_string_cost(url: str, rounds: int) -> dict[str, float]:
    """Median seconds of the neighbour alone, beside 8 plain requests, beside 8 with the most stop strings
    (the three alternate within each round)."""
    most = [f"{index:02d}" + "~" * 254 for index in range(32)]
    times: dict[str, list[float]] = {"alone": [], "plain": [], "stops": []}
    for _ in range(rounds):
        times["alone"].append(neighbour_seconds(url, 0, []))
        times["plain"].append(neighbour_seconds(url, 8, []))
        times["stops"].append(neighbour_seconds(url, 8, most))
    return {key: statistics.median(values) for key, values in times.items()}


def stop_check_ms(tokenizer, stops: list[str]) -> float:
    """Milliseconds a token of `TextStream` (decoding, stop search, hold-back), best of 5 over 96 tokens."""
    ids = tokenizer("Once upon a time, in a land far away, there lived a king with three daughters. " * 3)
    best = float("inf")
    for _ in range(5):
        stream, start = TextStream(tokenizer, stops), time.perf_counter()
        for token in ids["input_ids"][:96]:
            stream.push(token)
        best = min(best, (time.perf_counter() - start) / 96 * 1e3)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    limits = "max_request_bytes" in inspect.signature(create_app).parameters
    print(f"torch threads {torch.get_num_threads()}; this tree {'has' if limits else 'lacks'} the request limits")
    with tempfile.TemporaryDirectory() as tmp:
        engine, app = start_server(Path(tmp))
        try:
            with BackgroundServer(app) as url:
                print("\n| request | status | seconds to the answer | slowest /health meanwhile (s) |")
                print("|---|---|---|---|")
                for label, status, seconds, slowest in oversized(url):
                    print(f"| {label} | {status} | {seconds:.2f} | {slowest} |")
                cost = stop_string_cost(url, args.rounds)
                print("\n| a neighbour's 32-token request | median s | vs beside plain requests |\n|---|---|---|")
                print(f"| alone | {cost['alone']:.2f} | |")
                print(f"| beside 8 requests without stop strings | {cost['plain']:.2f} | 1.00x |")
                print(f"| beside 8 requests with 32 stop strings of 256 chars | {cost['stops']:.2f} | "
                      f"{cost['stops'] / cost['plain']:.2f}x |")
                most = [f"{index:02d}" + "~" * 254 for index in range(32)]
                print(f"\nstop check per token: {stop_check_ms(engine.tokenizer, []):.3f} ms without stop strings, "
                      f"{stop_check_ms(engine.tokenizer, most):.3f} ms with 32 of 256 characters")
        finally:
            engine.shutdown()


if __name__ == "__main__":
    main()
