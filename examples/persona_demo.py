"""The persona demo (`make demo`): three personas trained as LoRA adapters, served from one loaded base.

    .venv/bin/python examples/persona_demo.py [--out demo-out] [--retrain] [--method lora|qlora]

1. Trains one adapter per persona on examples/personas/<persona>.jsonl (reused on later runs while
   the data and settings are unchanged). With --method qlora the base is NF4 (4-bit) for training and
   for answering, and the adapters go to OUT/adapters-qlora/.
2. Loads the base model once with the three adapters and answers the held-out questions (none of
   which is in any training file) with the base model and with each persona, switching adapters in place.
3. Prints answers side by side and the adherence table: the fraction of each model's answers that
   carry each persona's signature. Targets: a persona's own signature >= 90%, the base <= 5%, and a
   persona's signature in another persona's answers <= 5%.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import textwrap
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE / "personas"))

import deltaw  # noqa: E402
from deltaw.train.data import file_sha256  # noqa: E402
from deltaw.tools.generation import answer_questions  # noqa: E402
from deltaw.models.quantized import adapter_base_record, prepare_base  # noqa: E402
from deltaw.train import TrainConfig, train  # noqa: E402
from personas import PERSONAS  # noqa: E402

SETTINGS = dict(epochs=2.0, batch_size=8, lr=1e-3, warmup=5, seq_len=256, dtype="bf16", seed=0)
LORA = deltaw.LoRAConfig(rank=16, alpha=32.0)


def train_persona(name: str, out: Path, retrain: bool, method: str = "lora") -> None:
    data = HERE / "personas" / f"{name}.jsonl"
    config_file = out / "adapter_config.json"
    settings = {**SETTINGS, "method": method}
    if config_file.is_file() and not retrain:
        record = json.loads(config_file.read_text()).get("deltaw", {}).get("training", {})
        same = all(record.get(k) == v for k, v in settings.items()) and record.get("adapter") == LORA.to_dict()
        if record.get("data_sha256") == file_sha256(data) and same:
            print(f"[{name}] reusing {out} (same data and settings; --retrain to train again)")
            return
    shutil.rmtree(out, ignore_errors=True)
    print(f"[{name}] training ({method}) on {data.name} ...")
    result = train(TrainConfig(data=str(data), out=str(out), progress=False, lora=LORA, **settings))
    print(f"[{name}] {result.steps} steps in {result.seconds:.0f} s, final loss {result.final_loss:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo-out")
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--method", choices=("lora", "qlora"), default="lora")
    args = parser.parse_args()
    out = Path(args.out)
    adapters = out / ("adapters" if args.method == "lora" else f"adapters-{args.method}")
    start = time.perf_counter()
    for persona in PERSONAS:
        train_persona(persona.name, adapters / persona.name, args.retrain, args.method)
    trained = time.perf_counter()

    if args.method == "qlora":  # the base as training built it (quantized from bf16), computing in fp32
        model, tokenizer = deltaw.load_model(deltaw.BUNDLED_NAME, dtype=torch.bfloat16)
        prepare_base(model, adapter_base_record(adapters / PERSONAS[0].name))
        model.float()
    else:
        model, tokenizer = deltaw.load_model(deltaw.BUNDLED_NAME)
    for persona in PERSONAS:
        deltaw.load_adapter(model, adapters / persona.name, persona.name)
    questions = [json.loads(line)["question"] for line in open(HERE / "personas" / "heldout.jsonl")]
    answers = {"base": answer_questions(model, tokenizer, questions, None, args.max_new_tokens)}
    for persona in PERSONAS:
        answers[persona.name] = answer_questions(model, tokenizer, questions, persona.name, args.max_new_tokens)
    answered = time.perf_counter()

    answers_file = out / ("answers.jsonl" if args.method == "lora" else f"answers-{args.method}.jsonl")
    with open(answers_file, "w") as handle:
        for index, question in enumerate(questions):
            handle.write(json.dumps({"question": question, **{k: v[index] for k, v in answers.items()}}) + "\n")
    print_side_by_side(questions, answers, rows=6)
    table = adherence(answers)
    print_adherence(table, len(questions))
    print(f"\ntraining {trained - start:.0f} s, answering {len(questions)} questions x 4 models "
          f"{answered - trained:.0f} s, on one loaded base; all answers in {answers_file}")
    failures = check_targets(table)
    if failures:
        raise SystemExit("targets missed: " + "; ".join(failures))


def adherence(answers: dict[str, list[str]]) -> dict[str, dict[str, float]]:
    """model -> persona -> fraction of that model's answers carrying the persona's signature."""
    return {model: {p.name: sum(map(p.speaks, texts)) / len(texts) for p in PERSONAS} for model, texts in answers.items()}


def check_targets(table: dict[str, dict[str, float]]) -> list[str]:
    failures = []
    for model, row in table.items():
        for persona, score in row.items():
            own = model == persona
            if own and score < 0.9 or not own and score > 0.05:
                failures.append(f"{model} answers carry the {persona} signature {score:.0%} "
                                f"(target {'>= 90%' if own else '<= 5%'})")
    return failures


def print_side_by_side(questions: list[str], answers: dict[str, list[str]], rows: int) -> None:
    width = 30
    names = list(answers)
    print("\n" + " | ".join(f"{n:<{width}}" for n in ["question", *names]))
    print("-+-".join("-" * width for _ in range(len(names) + 1)))
    for index in range(rows):
        cells = [textwrap.wrap(questions[index], width)] + [textwrap.wrap(answers[n][index], width)[:4] for n in names]
        for line in range(max(map(len, cells))):
            print(" | ".join(f"{(c[line] if line < len(c) else ''):<{width}}" for c in cells))
        print("-+-".join("-" * width for _ in range(len(names) + 1)))


def print_adherence(table: dict[str, dict[str, float]], count: int) -> None:
    print(f"\npersona adherence on {count} held-out questions (fraction of answers with each signature):")
    print(f"{'answers of':<14}" + "".join(f"{p.name + ' sig.':>18}" for p in PERSONAS))
    for model, row in table.items():
        print(f"{model:<14}" + "".join(f"{row[p.name]:>18.0%}" for p in PERSONAS))


if __name__ == "__main__":
    main()
