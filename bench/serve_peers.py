"""Serving speed against the peers: `deltaw serve`, vLLM's OpenAI server (CPU build) and llama.cpp's llama-server,
all driven by one workload through the real `openai` client, on the bundled SmolLM2-135M in bf16.

Four random LoRA adapters (a0, a1: rank 8; a2, a3: rank 4; every linear layer) are written in PEFT's layout (what
deltaw and vLLM load) and as llama.cpp LoRA GGUFs (deltaw's own export); llama-server gets the base as a bf16 GGUF
(llama.cpp's own converter). Every server is started once, with all four adapters, and then every workload runs
against each server in turn, round after round (servers alternate within a round), so that load on the machine
hits all of them alike. Each request asks for `--tokens` greedy tokens with `ignore_eos` (all three servers take
it), so every server does the same work.

Workloads (chat requests on held-out persona questions, all sent at once):
    base only      `--clients` requests on the base model
    one adapter    `--clients` requests all on a0
    mixed          `--clients` requests cycling a0, a1, a2, a3, base
    many mixed     `--many` requests cycling the same way: time to first token p50/p90, tokens/s
                   (only on `--many-servers`)

Every request is streamed; time to first token is measured at the first chunk that carries text. Every server
may run `--rows` requests in one batch (deltaw `--max-batch-size`, vLLM `--max-num-seqs`, llama-server `-np`), 64 by
default, so that the 64-client workload measures batching, not a queue four deep.

Peers that are not installed (tests/peers/setup_peers.sh installs them) are skipped, and the table says so.

    .venv/bin/python bench/serve_peers.py [--rounds 2] [--tokens 64] [--clients 16] [--many 64] [--threads 2]
        [--rows 64] [--servers deltaw,vllm,llama.cpp] [--many-servers deltaw,vllm] [--deltaw-dtype bf16]
        [--deltaw-arg=--prefill-chunk=256 ...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from openai import AsyncOpenAI
from transformers import AutoConfig

import deltaw
from deltaw.adapters.lora import lora_layers
from deltaw.adapters.lora.files import read_lora_adapter
from deltaw.adapters.lora.gguf import write_gguf
from deltaw.models.loading import BUNDLED_NAME, resolve_model_dir

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.peers.engines import (  # noqa: E402
    CACHE, LLAMA_SERVER, VLLM_PYTHON, VLLM_STAMP, free_port, llama_version, server_process,
)

ADAPTERS = {"a0": 8, "a1": 8, "a2": 4, "a3": 4}  # name -> rank
MIXED = [*ADAPTERS, None]  # the mixed workloads cycle through these (None: the base model)
QUESTIONS = REPO / "examples" / "personas" / "heldout.jsonl"
BF16_GGUF = CACHE / "models" / "SmolLM2-135M-Instruct-bf16.gguf"
HF_TO_GGUF = CACHE / "llama.cpp" / "refs" / "convert_hf_to_gguf.py"
WORKLOADS = {"base only": [None], "one adapter": ["a0"], "mixed": MIXED}


# ------------------------------------------------------------------------------------------------- files
def write_adapters(directory: Path) -> dict[str, Path]:
    """The four adapters in PEFT's layout (random A, B with std 0.02, alpha = 2 * rank); name -> directory."""
    base, _ = deltaw.load_model(dtype=torch.float32)
    paths = {}
    for seed, (name, rank) in enumerate(ADAPTERS.items()):
        model = copy.deepcopy(base)
        torch.manual_seed(seed)
        deltaw.add_lora(model, deltaw.LoRAConfig(rank=rank, alpha=2 * rank), name=name)
        for _, layer in lora_layers(model):
            layer.lora_B[name].data.normal_(0, 0.02)
        deltaw.save_adapter(model, directory / name, name)
        paths[name] = directory / name
    return paths


def write_gguf_adapters(adapters: dict[str, Path], directory: Path) -> list[Path]:
    """The adapters as llama.cpp LoRA GGUFs (f32), in the order of `adapters` (their llama-server ids)."""
    base_config = AutoConfig.from_pretrained(resolve_model_dir(BUNDLED_NAME))
    files = []
    for name, path in adapters.items():
        write_gguf(read_lora_adapter(path), base_config, directory / f"{name}.gguf")
        files.append(directory / f"{name}.gguf")
    return files


def bf16_gguf() -> Path:
    """The bundled model as a bf16 GGUF (llama.cpp's converter on deltaw's HF conversion), cached."""
    if not BF16_GGUF.exists():
        BF16_GGUF.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(VLLM_PYTHON), str(HF_TO_GGUF), resolve_model_dir(BUNDLED_NAME), "--outtype", "bf16",
                        "--outfile", str(BF16_GGUF)], check=True, capture_output=True)
    return BF16_GGUF


# ------------------------------------------------------------------------------------------------- servers
@dataclass
class Server:
    """A running server and how a request names an adapter on it."""

    key: str  # as --servers names it
    name: str
    url: str
    base_model: str
    llama_ids: dict[str, int] = field(default_factory=dict)  # llama.cpp: adapter name -> id in the `lora` list

    def request(self, adapter: str | None) -> dict:
        """The `model` and extra body fields that select `adapter` (None: the base model)."""
        if self.llama_ids:  # llama-server: every adapter listed, the chosen one at scale 1
            lora = [{"id": i, "scale": float(name == adapter)} for name, i in self.llama_ids.items()]
            return {"model": self.base_model, "extra_body": {"lora": lora, "ignore_eos": True}}
        return {"model": adapter or self.base_model, "extra_body": {"ignore_eos": True}}


@contextlib.contextmanager
def deltaw_server(adapters: dict[str, Path], threads: int, dtype: str, rows: int,
                  extra: list[str]) -> Iterator[Server]:
    port = free_port()
    command = [sys.executable, "-m", "deltaw", "serve", "--port", str(port), "--max-batch-size", str(rows),
               "--log-level", "warning", *(arg for n, p in adapters.items() for arg in ("--adapter", f"{n}={p}"))]
    if dtype:
        command += ["--dtype", dtype]
    command += extra
    env = {"OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO / "src")}
    with server_process("deltaw", command, port, timeout=300, env=env) as url:
        yield Server("deltaw", "deltaw", url, BUNDLED_NAME)


@contextlib.contextmanager
def vllm_server(adapters: dict[str, Path], threads: int, rows: int) -> Iterator[Server]:
    port = free_port()
    command = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", resolve_model_dir(BUNDLED_NAME),
               "--served-model-name", "smollm2", "--dtype", "bfloat16", "--port", str(port), "--enable-lora",
               "--max-lora-rank", "16", "--max-loras", "4", "--max-model-len", "2048", "--max-num-seqs", str(rows),
               "--lora-modules", *(f"{name}={path}" for name, path in adapters.items())]
    env = {"VLLM_CPU_OMP_THREADS_BIND": "0" if threads == 1 else f"0-{threads - 1}", "VLLM_CPU_KVCACHE_SPACE": "1"}
    with server_process("vllm", command, port, timeout=900, env=env) as url:
        yield Server("vllm", f"vLLM {VLLM_STAMP.read_text().split()[0].split('==')[-1]}", url, "smollm2")


@contextlib.contextmanager
def llama_server(ggufs: list[Path], threads: int, rows: int) -> Iterator[Server]:
    port = free_port()
    command = [str(LLAMA_SERVER), "-m", str(bf16_gguf()), "--port", str(port), "-t", str(threads),
               "-c", str(1024 * rows), "-np", str(rows), "--no-webui", "--lora-init-without-apply",
               *(a for g in ggufs for a in ("--lora", str(g)))]
    with server_process("llama-server", command, port, timeout=300) as url:
        yield Server("llama.cpp", f"llama.cpp {llama_version()}", url, "smollm2", {g.stem: i for i, g in enumerate(ggufs)})


# ------------------------------------------------------------------------------------------------- workloads
async def one_request(client: AsyncOpenAI, server: Server, question: str, adapter: str | None,
                      tokens: int) -> tuple[float, float, int]:
    """(seconds to the first token, seconds to the end, completion tokens) of one streamed chat request."""
    start = time.perf_counter()
    first, count = None, 0
    stream = await client.chat.completions.create(
        messages=[{"role": "user", "content": question}], max_tokens=tokens, temperature=0.0, stream=True,
        stream_options={"include_usage": True}, **server.request(adapter))
    async for chunk in stream:
        if first is None and chunk.choices and (chunk.choices[0].delta.content or chunk.choices[0].finish_reason):
            first = time.perf_counter() - start
        if chunk.usage is not None:
            count = chunk.usage.completion_tokens
    return first, time.perf_counter() - start, count


async def workload(server: Server, questions: list[str], adapters: list, count: int, tokens: int) -> dict:
    """`count` requests at once (request i on adapters[i % len]): tokens/s over the wall time, TTFT p50/p90."""
    async with AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", timeout=1800, max_retries=0) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one_request(client, server, questions[i % len(questions)],
                                                     adapters[i % len(adapters)], tokens) for i in range(count)))
        wall = time.perf_counter() - start
    made = sum(r[2] for r in results)
    if made != count * tokens:
        raise RuntimeError(f"{server.name}: made {made} tokens, expected {count * tokens} (ignore_eos not honoured?)")
    ttfts = sorted(r[0] for r in results)
    return {"tok/s": made / wall, "ttft p50": statistics.median(ttfts), "ttft p90": ttfts[int(0.9 * (len(ttfts) - 1))]}


def run_rounds(servers: list[Server], questions: list[str], args: argparse.Namespace) -> dict:
    """{(workload, metric): {server name: [value per round]}}, servers alternating within every round (the
    `--many` workload only on the servers named by `--many-servers`)."""
    plan = {**{name: (adapters, args.clients) for name, adapters in WORKLOADS.items()},
            f"{args.many} clients mixed": (MIXED, args.many)}
    for server in servers:  # warm-up: every adapter once, a few tokens
        asyncio.run(workload(server, questions, MIXED, len(MIXED), 4))
    results: dict = {}
    for round_index in range(1, args.rounds + 1):
        for name, (adapters, count) in plan.items():
            for server in servers:
                if count == args.many and server.key not in args.many_servers.split(","):
                    continue
                measured = asyncio.run(workload(server, questions, adapters, count, args.tokens))
                print(f"round {round_index} {name:>18} {server.name:>16}: " + ", ".join(
                    f"{k} {v:.2f}" for k, v in measured.items()), flush=True)
                for metric, value in measured.items():
                    if metric == "tok/s" or name.startswith(str(args.many)):
                        results.setdefault((name, metric), {}).setdefault(server.name, []).append(value)
    return results


def table(results: dict, names: list[str], skipped: list[str]) -> str:
    """Medians per workload and server, with each peer's ratio to deltaw (higher is better for deltaw)."""
    lines = ["| workload | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for (workload_name, metric), by_server in results.items():
        ours = statistics.median(by_server["deltaw"]) if "deltaw" in by_server else None
        cells = []
        for name in names:
            if name not in by_server:
                cells.append("not run")
                continue
            value = statistics.median(by_server[name])
            ratio = "" if ours is None or name == "deltaw" else (
                f" (deltaw {ours / value:.2f}×)" if metric == "tok/s" else f" (deltaw {value / ours:.2f}× faster)")
            cells.append(f"{value:.1f}{ratio}" if metric == "tok/s" else f"{value:.2f} s{ratio}")
        lines.append(f"| {workload_name}: {metric} | " + " | ".join(cells) + " |")
    if "mixed" in [k[0] for k in results] and "deltaw" in names:
        mixed = statistics.median(results[("mixed", "tok/s")]["deltaw"])
        base = statistics.median(results[("base only", "tok/s")]["deltaw"])
        lines.append(f"\ndeltaw mixed / base only: {mixed / base:.2f}")
    lines += [f"\nskipped: {s}" for s in skipped]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--many", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of every server")
    parser.add_argument("--rows", type=int, default=64,
                        help="the most requests every server runs in one batch (deltaw --max-batch-size, vLLM "
                             "--max-num-seqs, llama-server -np)")
    parser.add_argument("--servers", default="deltaw,vllm,llama.cpp")
    parser.add_argument("--many-servers", default="deltaw,vllm,llama.cpp",
                        help="servers that run the --many workload (llama.cpp takes minutes for it on 2 cores)")
    parser.add_argument("--deltaw-dtype", default="", help="deltaw serve --dtype (default: deltaw's own choice)")
    parser.add_argument("--deltaw-arg", action="append", default=[],
                        help="one more argument for deltaw serve, e.g. --deltaw-arg=--prefill-chunk=256 (repeatable)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/deltaw-serve-peers"))
    args = parser.parse_args()
    wanted = args.servers.split(",")
    questions = [json.loads(line)["question"] for line in QUESTIONS.read_text().splitlines()]
    args.work.mkdir(parents=True, exist_ok=True)
    adapters = write_adapters(args.work)
    skipped = []
    with contextlib.ExitStack() as stack:
        servers = []
        if "deltaw" in wanted:
            servers.append(stack.enter_context(deltaw_server(adapters, args.threads, args.deltaw_dtype, args.rows,
                                                             args.deltaw_arg)))
        if "vllm" in wanted:
            if VLLM_PYTHON.exists():
                servers.append(stack.enter_context(vllm_server(adapters, args.threads, args.rows)))
            else:
                skipped.append(f"vLLM: {VLLM_PYTHON} missing (run tests/peers/setup_peers.sh)")
        if "llama.cpp" in wanted:
            if LLAMA_SERVER.exists():
                servers.append(stack.enter_context(llama_server(write_gguf_adapters(adapters, args.work),
                                                                args.threads, args.rows)))
            else:
                skipped.append(f"llama.cpp: {LLAMA_SERVER} missing (run tests/peers/setup_peers.sh)")
        results = run_rounds(servers, questions, args)
    print(f"\n{args.clients} clients x {args.tokens} greedy tokens (ignore_eos), {args.threads} threads per server, "
          f"medians of {args.rounds} rounds; load average at the end: {os.getloadavg()[0]:.1f}\n")
    print(table(results, [server.name for server in servers], skipped))


if __name__ == "__main__":
    main()
