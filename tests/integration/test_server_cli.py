"""`deltaw serve` as a user runs it: a subprocess on a tiny model, answering the openai client; its errors."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

import deltaw
from deltaw.cli import main
from tests.integration.serving import write_random_adapters

DELTAW = str(Path(sys.executable).parent / "deltaw")


@pytest.fixture(scope="module")
def adapters_dir(tiny_model_dir, tmp_path_factory):
    model, _ = deltaw.load_model(tiny_model_dir)
    directory = tmp_path_factory.mktemp("cli") / "adapters"
    write_random_adapters(model, directory, {"alpha": deltaw.LoRAConfig(rank=4, alpha=8)}, std=0.5)
    return directory


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_health(url: str, process: subprocess.Popen) -> None:
    for _ in range(600):
        if process.poll() is not None:
            raise AssertionError(f"deltaw serve exited with {process.returncode}: {process.stderr.read()}")
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError("deltaw serve did not answer /health within a minute")


@pytest.mark.slow  # a fresh Python process importing torch: seconds
def test_deltaw_serve_answers_the_openai_client(tiny_model_dir, adapters_dir):
    port = free_port()
    command = [DELTAW, "serve", "--model", str(tiny_model_dir), "--adapter", f"alpha={adapters_dir / 'alpha'}",
               "--adapters-dir", str(adapters_dir), "--port", str(port), "--api-key", "k", "--log-level", "warning"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_health(url, process)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0)
        assert [card.id for card in client.models.list()] == [Path(tiny_model_dir).name, "alpha"]
        reply = client.completions.create(model="alpha", prompt="Hello", max_tokens=3)
        assert reply.usage.completion_tokens <= 3 and reply.model == "alpha"
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.parametrize(("flags", "message"), [
    (["--adapters-dir", "/no/such/dir"], "--adapters-dir /no/such/dir: no such directory"),
    (["--adapter", "alpha=/no/such/adapter"], "--adapter alpha=/no/such/adapter: no such adapter directory"),
    (["--max-resident", "0"], "--max-resident must be at least 1, found 0"),
    (["--adapter", "../alpha={adapters}/alpha"], "invalid adapter name '../alpha'"),
])
def test_deltaw_serve_flag_errors_are_one_line_and_exit_2(tiny_model_dir, adapters_dir, capsys, flags, message):
    flags = [flag.format(adapters=adapters_dir) for flag in flags]
    assert main(["serve", "--model", str(tiny_model_dir), *flags]) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("deltaw serve: error: ") and message in last
