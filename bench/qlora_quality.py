"""LoRA vs QLoRA on one persona: the same adapter trained on a bf16 base and on an NF4 base, side by side.

Both runs use the persona demo's settings (examples/persona_demo.py: 2 epochs, batch 8, lr 1e-3, r=16,
bf16 compute) on the pirate chats minus a 10% validation split, then answer the 51 held-out questions.
Reported: validation loss, persona adherence (examples/personas/personas.py), seconds.

    .venv/bin/python bench/qlora_quality.py [--out bench-out/qlora-quality] [--persona pirate]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "examples" / "personas"))

import deltaw  # noqa: E402
from deltaw.tools.generation import answer_questions  # noqa: E402
from deltaw.models.quantized import adapter_base_record, prepare_base  # noqa: E402
from deltaw.train import TrainConfig, train  # noqa: E402
from persona_demo import LORA, SETTINGS  # noqa: E402
from personas import PERSONAS  # noqa: E402


def run(method: str, persona: str, out: Path, questions: list[str]) -> dict:
    data = ROOT / "examples" / "personas" / f"{persona}.jsonl"
    result = train(TrainConfig(data=str(data), out=str(out / method), method=method, val_split=0.1, progress=False,
                               lora=LORA, **SETTINGS))
    model, tokenizer = deltaw.load_model(dtype=torch.bfloat16)
    if method == "qlora":
        prepare_base(model, adapter_base_record(out / method))  # the base exactly as training built it
    model.float()
    deltaw.load_adapter(model, out / method, persona)
    answers = answer_questions(model, tokenizer, questions, persona, max_new_tokens=48)
    speaks = next(p for p in PERSONAS if p.name == persona).speaks
    return {"val_loss": result.final_val_loss, "adherence": sum(map(speaks, answers)) / len(answers),
            "seconds": result.seconds, "steps": result.steps, "answers": answers[:3]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-out/qlora-quality")
    parser.add_argument("--persona", default="pirate", choices=[p.name for p in PERSONAS])
    args = parser.parse_args()
    questions = [json.loads(line)["question"] for line in open(ROOT / "examples" / "personas" / "heldout.jsonl")]
    results = {method: run(method, args.persona, Path(args.out), questions) for method in ("lora", "qlora")}
    lora = results["lora"]
    print(f"\n{args.persona}, {lora['steps']} steps each, {len(questions)} held-out questions\n")
    print("| base | validation loss | vs LoRA | persona adherence | training s |")
    print("|---|---|---|---|---|")
    for method, row in results.items():
        change = 100 * (row["val_loss"] - lora["val_loss"]) / lora["val_loss"]
        print(f"| {'bf16 (LoRA)' if method == 'lora' else 'NF4 (QLoRA)'} | {row['val_loss']:.4f} | {change:+.1f}% | "
              f"{row['adherence']:.0%} | {row['seconds']:.0f} |")
    for method, row in results.items():
        print(f"\n{method} sample answers:\n  " + "\n  ".join(row["answers"]))


if __name__ == "__main__":
    main()
