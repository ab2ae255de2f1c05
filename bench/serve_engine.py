"""The serving engine alone (no HTTP), before and after a change: throughput of 16 rows of the bundled model in bf16,
base only / one adapter / 4 adapters + base mixed, 64 greedy tokens each (EOS ignored), and the median decode
step (the interval between two tokens of the last row, while every row runs).

Each `--src` (a checkout's src/ directory, e.g. one exported with `git archive integrate src | tar -x -C /tmp/old`)
runs in its own worker process, and the workers alternate round after round, so that load on the machine hits
them alike; the table shows medians. Extra `--env NAME=VALUE` settings make a variant of the current checkout
(e.g. DELTAW_PACKED_LINEAR=0).

    .venv/bin/python bench/serve_engine.py --src /tmp/old/src --src src [--env DELTAW_PACKED_LINEAR=0] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ADAPTERS = {"a0": 8, "a1": 8, "a2": 4, "a3": 4}
MODES = {"base only": [None], "one adapter": ["a0"], "mixed": [*ADAPTERS, None]}


def worker(adapters: Path, rows: int, tokens: int, threads: int) -> None:
    """Print {mode: tokens/s} as JSON for the deltaw on sys.path."""
    import torch

    import deltaw
    from deltaw.serve import AdapterBank, Engine, SamplingParams

    torch.set_num_threads(threads)
    model, tokenizer = deltaw.load_model(dtype=torch.bfloat16)
    bank = AdapterBank(model, max_resident=8)
    for name in ADAPTERS:
        bank.load(name, adapters / name)
    questions = [json.loads(line)["question"] for line in
                 (REPO / "examples" / "personas" / "heldout.jsonl").read_text().splitlines()[:rows]]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False) for q in questions]
    engine = Engine(model, tokenizer, bank, max_batch_size=rows)
    engine.eos_ids = set()
    results = {}
    with engine:
        for mode, choices in MODES.items():
            for count in (2, tokens):  # a short warm-up, then the measured run
                start = time.perf_counter()
                handles = [engine.submit(p, choices[i % len(choices)], SamplingParams(max_tokens=count))
                           for i, p in enumerate(prompts)]
                arrivals = [time.perf_counter() for _ in handles[-1]]  # the last row: one token per decode step
                for handle in handles:
                    handle.result()
            steps = [later - earlier for earlier, later in zip(arrivals, arrivals[1:])]
            results[mode] = {"tok/s": rows * tokens / (time.perf_counter() - start),
                             "step ms": 1000 * statistics.median(steps)}
    print(json.dumps(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", action="append", default=[], help="a checkout's src/ (repeatable)")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE: the current src/ with this setting")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--adapters", type=Path, default=Path("/tmp/deltaw-serve-peers"),
                        help="a0..a3 written by bench/serve_peers.py")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.adapters, args.rows, args.tokens, args.threads)
    variants = {src: {"PYTHONPATH": src} for src in args.src}
    variants |= {f"src, {env}": {"PYTHONPATH": str(REPO / "src"), env.split("=")[0]: env.split("=", 1)[1]}
                 for env in args.env}
    results: dict[str, dict[str, dict[str, list[float]]]] = {
        name: {mode: {"tok/s": [], "step ms": []} for mode in MODES} for name in variants}
    for _ in range(args.rounds):
        for name, env in variants.items():
            output = subprocess.run([sys.executable, __file__, "--worker", "--rows", str(args.rows), "--tokens",
                                     str(args.tokens), "--threads", str(args.threads), "--adapters", str(args.adapters)],
                                    env={**os.environ, **env}, capture_output=True, text=True, check=True).stdout
            for mode, measured in json.loads(output.strip().splitlines()[-1]).items():
                for metric, value in measured.items():
                    results[name][mode][metric].append(value)
            print(name, results[name], flush=True)
    print(f"\n{args.rows} rows x {args.tokens} tokens, bf16, {args.threads} thread(s), medians of {args.rounds} rounds; "
          f"load average {os.getloadavg()[0]:.1f}\n")
    print("| tokens/s (decode step, ms) | " + " | ".join(MODES) + " |\n|---|---|---|---|")
    for name, by_mode in results.items():
        print(f"| {name} | " + " | ".join(f"{statistics.median(m['tok/s']):.1f} ({statistics.median(m['step ms']):.0f})"
                                          for m in by_mode.values()) + " |")


if __name__ == "__main__":
    main()
