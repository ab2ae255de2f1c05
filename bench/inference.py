"""Inference with LoRA: deltaw vs PEFT, side by side in one run, on the bundled SmolLM2-135M.

For fp32 and bf16: forward latency of the base model and of the model with an unmerged r=16 all-linear
adapter (overhead over the base), merge and unmerge time, and the time to switch adapters by merging.
The measurements alternate between deltaw and PEFT round by round; the table shows medians.

    .venv/bin/python bench/inference.py [--rounds 15] [--batch 4] [--seq-len 128]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from collections.abc import Callable

import peft
import torch

import deltaw
from deltaw.adapters.lora import lora_layers

warnings.filterwarnings("ignore")


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return 1000 * (time.perf_counter() - start)


def randomize(params, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for param in params:
        param.data.copy_(torch.randn(param.shape, generator=generator) * 0.01)


def build(base: torch.nn.Module, dtype: torch.dtype):
    """(plain base, deltaw model with adapters a and b, PEFT model with adapters a and b)."""
    plain = copy.deepcopy(base).to(dtype)
    ours = copy.deepcopy(base).to(dtype)
    for name in ("a", "b"):
        deltaw.add_lora(ours, deltaw.LoRAConfig(rank=16, alpha=32), name=name)
        randomize([layer.lora_B[name] for _, layer in lora_layers(ours)], seed=len(name))
    deltaw.set_adapter(ours, "a")
    config = peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
    theirs = peft.get_peft_model(copy.deepcopy(base).to(dtype), config, adapter_name="a")
    theirs.add_adapter("b", config)
    randomize([p for n, p in theirs.named_parameters() if "lora_B" in n], seed=1)
    theirs.set_adapter("a")
    theirs.eval()
    return plain.eval(), ours.eval(), theirs


def measure(base: torch.nn.Module, dtype: torch.dtype, rounds: int, batch: int, seq_len: int) -> dict[str, list[float]]:
    plain, ours, theirs = build(base, dtype)
    tokens = torch.randint(0, base.config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    results: dict[str, list[float]] = {}

    def record(key: str, fn: Callable[[], object]) -> None:
        results.setdefault(key, []).append(timed(fn))

    def peft_switch(to: str) -> None:
        theirs.unmerge_adapter()
        theirs.set_adapter(to)
        theirs.merge_adapter()

    with torch.inference_mode():
        for warmup in (True, False):
            for _ in range(2 if warmup else rounds):
                record("forward base", lambda: plain(tokens))
                record("forward lora deltaw", lambda: ours(tokens))
                record("forward lora peft", lambda: theirs(tokens))
                record("merge deltaw", lambda: deltaw.merge_adapter(ours, "a"))
                record("switch deltaw", lambda: deltaw.merge_adapter(ours, "b"))
                record("unmerge deltaw", lambda: deltaw.unmerge_adapter(ours))
                deltaw.set_adapter(ours, "a")
                record("merge peft", lambda: theirs.merge_adapter())
                record("switch peft", lambda: peft_switch("b"))
                record("unmerge peft", lambda: theirs.unmerge_adapter())
                theirs.set_adapter("a")
            if warmup:
                results.clear()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()
    base, _ = deltaw.load_model(deltaw.BUNDLED_NAME)
    print(f"bundled SmolLM2-135M, LoRA r=16 alpha=32 all-linear (210 layers), forward on {args.batch}x{args.seq_len} "
          f"tokens, {torch.get_num_threads()} threads, torch {torch.__version__}, peft {peft.__version__}; "
          f"medians of {args.rounds} alternating rounds after 2 warm-up rounds\n")
    header = f"| {'dtype':<5} | {'measure':<28} | {'deltaw':>10} | {'PEFT':>10} | {'deltaw/PEFT':>11} |"
    print(header)
    print("|" + "|".join("-" * (len(part) + 0) for part in header.split("|")[1:-1]) + "|")
    for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        med = {key: statistics.median(values) for key, values in measure(base, dtype, args.rounds, args.batch, args.seq_len).items()}
        base_ms = med["forward base"]
        rows = [
            ("forward, base model (ms)", base_ms, base_ms),
            ("forward, unmerged LoRA (ms)", med["forward lora deltaw"], med["forward lora peft"]),
            ("unmerged overhead over base", med["forward lora deltaw"] / base_ms - 1, med["forward lora peft"] / base_ms - 1),
            ("merge (ms)", med["merge deltaw"], med["merge peft"]),
            ("unmerge (ms)", med["unmerge deltaw"], med["unmerge peft"]),
            ("merge + unmerge (ms)", med["merge deltaw"] + med["unmerge deltaw"], med["merge peft"] + med["unmerge peft"]),
            ("switch a->b by merging (ms)", med["switch deltaw"], med["switch peft"]),
        ]
        for name, ours, theirs in rows:
            if "overhead" in name:
                print(f"| {label:<5} | {name:<28} | {ours:>+10.1%} | {theirs:>+10.1%} | {'':>11} |")
            else:
                print(f"| {label:<5} | {name:<28} | {ours:>10.1f} | {theirs:>10.1f} | {ours / theirs:>11.2f} |")


if __name__ == "__main__":
    main()
