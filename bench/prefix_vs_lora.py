"""Prefix-tuning vs LoRA on one persona (pirate): parameters, validation loss, adherence, tokens/s.

Both adapters are trained by `deltaw.train.loop` with the persona demo's settings (examples/persona_demo.py:
2 epochs, batch 8, sequence length 256, bf16, 5 warm-up steps, seed 0), on the same 90% of
examples/personas/pirate.jsonl (the other 10% is the validation set), so both take the same number of
steps. LoRA: r=16, alpha=32 on all linear layers, lr 1e-3 (the demo's). Prefix: 20 virtual tokens,
initialised from the base model's keys/values of the first training tokens, lr 1e-2. Adherence: the fraction of greedy answers to the 51 held-out
questions (examples/personas/heldout.jsonl, 48 new tokens) that carry the pirate signature
(examples/personas/personas.py). Tokens/s: the median training throughput over the run's steps.

    .venv/bin/python bench/prefix_vs_lora.py [--out prefix-vs-lora] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "examples" / "personas"))

import torch  # noqa: E402

import deltaw  # noqa: E402
from deltaw.adapters import read_adapter  # noqa: E402
from deltaw.tools.generation import answer_questions  # noqa: E402
from deltaw.train.metrics import read_metrics  # noqa: E402
from deltaw.adapters.prefix import PrefixConfig  # noqa: E402
from deltaw.train import TrainConfig, train  # noqa: E402
from persona_demo import LORA, SETTINGS  # noqa: E402
from personas import PERSONAS  # noqa: E402

PERSONA = next(p for p in PERSONAS if p.name == "pirate")
COMMON = {key: value for key, value in SETTINGS.items() if key != "lr"}
RUNS = {
    "LoRA r=16 (lr 1e-3)": dict(method="lora", lr=1e-3, lora=LORA),
    "prefix 20 tokens (lr 1e-2)": dict(method="prefix", lr=1e-2, prefix=PrefixConfig(num_virtual_tokens=20)),
}


def trained(name: str, settings: dict, out: Path) -> dict:
    """Train one adapter; return its row of figures (adherence is filled in later)."""
    shutil.rmtree(out, ignore_errors=True)
    data = ROOT / "examples" / "personas" / f"{PERSONA.name}.jsonl"
    result = train(TrainConfig(data=str(data), out=str(out), val_split=0.1, progress=False, **COMMON, **settings))
    adapter = read_adapter(out)
    speeds = [record["tokens_per_s"] for record in read_metrics(out / "metrics.jsonl")]
    print(f"[{name}] {result.steps} steps in {result.seconds:.0f} s, validation loss {result.final_val_loss:.3f}",
          flush=True)
    return {"name": name, "parameters": adapter.num_parameters, "steps": result.steps,
            "val_loss": result.final_val_loss, "tokens_per_s": statistics.median(speeds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="prefix-vs-lora")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    rows = [trained(name, settings, out / f"adapter-{index}") for index, (name, settings) in enumerate(RUNS.items())]
    model, tokenizer = deltaw.load_model(deltaw.BUNDLED_NAME)
    for index in range(len(rows)):
        deltaw.load_adapter(model, out / f"adapter-{index}", f"adapter-{index}")
    questions = [json.loads(line)["question"] for line in open(ROOT / "examples" / "personas" / "heldout.jsonl")]
    total = sum(p.numel() for n, p in model.named_parameters() if "deltaw_prefixes" not in n and "lora_" not in n)
    base = answer_questions(model, tokenizer, questions, None, max_new_tokens=48)
    print(f"\npirate persona, {len(questions)} held-out questions; base model adherence "
          f"{sum(map(PERSONA.speaks, base)) / len(base):.0%}\n")
    print("| adapter | trainable parameters | steps | validation loss | pirate adherence | training tokens/s |")
    print("|---|---|---|---|---|---|")
    for index, row in enumerate(rows):
        answers = answer_questions(model, tokenizer, questions, f"adapter-{index}", max_new_tokens=48)
        adherence = sum(map(PERSONA.speaks, answers)) / len(answers)
        print(f"| {row['name']} | {row['parameters']:,} ({100 * row['parameters'] / total:.2f}%) | {row['steps']} | "
              f"{row['val_loss']:.3f} | {adherence:.0%} | {row['tokens_per_s']:,.0f} |", flush=True)
        print(f"  e.g. {questions[0]!r} -> {answers[0]!r}")


if __name__ == "__main__":
    main()
