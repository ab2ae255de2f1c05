"""Multi-adapter serving: deltaw's engine vs PEFT's mixed-batch generate, side by side in one run,
on the bundled SmolLM2-135M with four random r=16 all-linear adapters.

1. Throughput (new tokens/s) for a batch of 8 held-out persona questions, 64 new tokens each, greedy,
   EOS ignored so every row makes 64 tokens: all rows on one adapter, the 4 adapters mixed (2 rows
   each), and no adapter. deltaw: 8 requests submitted at once to the continuously batching engine.
   PEFT: `model.generate(..., adapter_names=[...])` on a left-padded batch. Rounds alternate between
   the two; the table shows medians.
2. Under 16 concurrent clients (threads calling Engine.submit, adapters and base in turn): time to
   first token and request latency percentiles (deltaw only: PEFT has no scheduler).
3. Adapter load time: AdapterBank.load vs PeftModel.load_adapter (medians).

    .venv/bin/python bench/serve.py [--rounds 3] [--tokens 64] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import threading
import time
import warnings
from pathlib import Path

import peft
import torch

import deltaw
from deltaw.adapters.lora import lora_layers
from deltaw.serve import AdapterBank, Engine, SamplingParams
from deltaw.serve.engine import summarize

warnings.filterwarnings("ignore")
ADAPTERS = ["a0", "a1", "a2", "a3"]
QUESTIONS = Path(__file__).resolve().parent.parent / "examples" / "personas" / "heldout.jsonl"
MODES = {  # mode -> the adapter of each of the 8 rows (None: the base model)
    "one adapter": ["a0"] * 8,
    "4 adapters mixed": [ADAPTERS[i % 4] for i in range(8)],
    "no adapter": [None] * 8,
}


def write_adapters(base: torch.nn.Module, directory: Path) -> None:
    """Four r=16 alpha=32 all-linear adapters with random B (std 0.01), saved in PEFT's layout."""
    model = copy.deepcopy(base)
    for seed, name in enumerate(ADAPTERS):
        torch.manual_seed(seed)
        deltaw.add_lora(model, deltaw.LoRAConfig(rank=16, alpha=32), name=name)
        generator = torch.Generator().manual_seed(seed)
        for _, layer in lora_layers(model):
            b = layer.lora_B[name]
            b.data.copy_(torch.randn(b.shape, generator=generator) * 0.01)
        deltaw.save_adapter(model, directory / name, name)


def chat_prompts(tokenizer, count: int) -> list[list[int]]:
    lines = QUESTIONS.read_text().splitlines()[:count]
    return [tokenizer.apply_chat_template([{"role": "user", "content": json.loads(line)["question"]}],
                                          add_generation_prompt=True, tokenize=True, return_dict=False)
            for line in lines]


def deltaw_run(engine: Engine, prompts: list[list[int]], adapters: list, tokens: int) -> float:
    """Seconds to generate `tokens` new tokens for every prompt, all submitted at once."""
    start = time.perf_counter()
    handles = [engine.submit(p, a, SamplingParams(max_tokens=tokens)) for p, a in zip(prompts, adapters)]
    assert all(handle.result().completion_tokens == tokens for handle in handles)
    return time.perf_counter() - start


def peft_run(model: peft.PeftModel, tokenizer, prompts: list[list[int]], adapters: list, tokens: int) -> float:
    """Seconds for one left-padded `generate` over the batch, each row with its adapter."""
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[tokenizer.pad_token_id or 0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    names = [a if a is not None else "__base__" for a in adapters]
    start = time.perf_counter()
    output = model.generate(input_ids=input_ids, attention_mask=mask, adapter_names=names, max_new_tokens=tokens,
                            min_new_tokens=tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                            pad_token_id=tokenizer.pad_token_id or 0)
    assert output.shape[1] == width + tokens
    return time.perf_counter() - start


def throughput(engine, theirs, tokenizer, prompts, rounds: int, tokens: int) -> dict[str, dict[str, list[float]]]:
    """{mode: {"deltaw": [tokens/s per round], "PEFT": [...]}}, alternating deltaw and PEFT."""
    results = {mode: {"deltaw": [], "PEFT": []} for mode in MODES}
    new_tokens = tokens * len(prompts)
    with torch.inference_mode():
        for round_index in range(rounds + 1):  # round 0 warms up
            for mode, adapters in MODES.items():
                ours = new_tokens / deltaw_run(engine, prompts, adapters, tokens)
                peft_seconds = peft_run(theirs, tokenizer, prompts, adapters, tokens)
                if round_index > 0:
                    results[mode]["deltaw"].append(ours)
                    results[mode]["PEFT"].append(new_tokens / peft_seconds)
    return results


def concurrent_latency(engine: Engine, prompts: list[list[int]], clients: int, waves: int, tokens: int) -> dict:
    """Time to first token and latency (s) of `clients` threads each sending `waves` requests in a row."""
    choices = [*ADAPTERS, None]
    ttft, latency = [], []
    lock = threading.Lock()

    def client(index: int) -> None:
        for wave in range(waves):
            start = time.perf_counter()
            handle = engine.submit(prompts[index % len(prompts)], choices[(index + wave) % 5],
                                   SamplingParams(max_tokens=tokens))
            first = handle.next_event()
            first_at = time.perf_counter()
            handle.result()
            with lock:
                ttft.append(first_at - start)
                latency.append(time.perf_counter() - start)
            del first

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    return {"ttft": summarize(ttft), "latency": summarize(latency), "tokens/s": clients * waves * tokens / wall}


def load_times(bank: AdapterBank, theirs: peft.PeftModel, directory: Path, rounds: int) -> tuple[float, float]:
    """Median seconds to load (replace) one adapter: deltaw bank vs PEFT."""
    ours, peft_times = [], []
    for index in range(rounds):
        start = time.perf_counter()
        bank.load("reloaded", directory / "a1")
        ours.append(time.perf_counter() - start)
        start = time.perf_counter()
        theirs.load_adapter(str(directory / "a1"), adapter_name=f"reloaded{index}")
        peft_times.append(time.perf_counter() - start)
        theirs.delete_adapter(f"reloaded{index}")
    return statistics.median(ours), statistics.median(peft_times)


def build(base: torch.nn.Module, tokenizer, directory: Path) -> tuple[Engine, AdapterBank, peft.PeftModel]:
    bank = AdapterBank(copy.deepcopy(base), max_resident=8)
    for name in ADAPTERS:
        bank.load(name, directory / name)
    engine = Engine(bank.model, tokenizer, bank, max_batch_size=16)
    engine.eos_ids = set()  # every request makes exactly --tokens tokens, as PEFT does with min_new_tokens
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(directory / ADAPTERS[0]), adapter_name=ADAPTERS[0])
    for name in ADAPTERS[1:]:
        theirs.load_adapter(str(directory / name), adapter_name=name)
    return engine, bank, theirs.eval()


def print_table(results: dict, latency: dict, loads: tuple[float, float]) -> None:
    median = {mode: {side: statistics.median(v) for side, v in sides.items()} for mode, sides in results.items()}

    def row(label: str, ours: str, theirs: str, ratio: str = "") -> None:
        print(f"| {label:<50} | {ours:>18} | {theirs:>9} | {ratio:>11} |")

    row("measure", "deltaw", "PEFT", "deltaw/PEFT")
    print(f"|{'-' * 52}|{'-' * 20}|{'-' * 11}|{'-' * 13}|")
    for mode, sides in median.items():
        ours, theirs = sides["deltaw"], sides["PEFT"]
        row(f"tokens/s, 8 rows, {mode}", f"{ours:.1f}", f"{theirs:.1f}", f"{ours / theirs:.2f}")
    mixed, one = median["4 adapters mixed"], median["one adapter"]
    row("mixed / one adapter (throughput ratio)", f"{mixed['deltaw'] / one['deltaw']:.2f}",
        f"{mixed['PEFT'] / one['PEFT']:.2f}")
    for key, label in (("ttft", "time to first token"), ("latency", "request latency")):
        summary = latency[key]
        row(f"{label}, 16 clients, p50/p90/p99 (s)", " / ".join(f"{summary[p]:.2f}" for p in ("p50", "p90", "p99")), "-")
    row("tokens/s, 16 clients", f"{latency['tokens/s']:.1f}", "-")
    ours, theirs = loads
    row("load one r=16 all-linear adapter (ms)", f"{1000 * ours:.1f}", f"{1000 * theirs:.1f}", f"{ours / theirs:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds per mode (after one warm-up round)")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base, tokenizer = deltaw.load_model(deltaw.BUNDLED_NAME)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        write_adapters(base, directory)
        engine, bank, theirs = build(base, tokenizer, directory)
        prompts = chat_prompts(tokenizer, 8)
        print(f"bundled SmolLM2-135M fp32, 4 LoRA adapters r=16 alpha=32 all-linear, {len(prompts)} held-out questions, "
              f"{args.tokens} new tokens each, greedy; {torch.get_num_threads()} threads, torch {torch.__version__}, "
              f"peft {peft.__version__}; medians of {args.rounds} alternating rounds after a warm-up round\n")
        with engine:
            results = throughput(engine, theirs, tokenizer, prompts, args.rounds, args.tokens)
            latency = concurrent_latency(engine, chat_prompts(tokenizer, args.clients), args.clients, 2, args.tokens)
        loads = load_times(bank, theirs, directory, rounds=5)
    print_table(results, latency, loads)


if __name__ == "__main__":
    main()
