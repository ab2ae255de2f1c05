"""Prefix-tuning recipes, deltaw's and PEFT's, on movie-review sentiment: which ones learn the task.

The data (bench/sentiment_data.py): movie-review snippets from the VADER data set on PyPI, a prompt
ending in "Answer:" and the completion " positive" or " negative"; `--train` training and `--test` test
snippets, class-balanced and disjoint. Accuracy: on the test prompts, whether the right one of the two
label tokens scores higher after the prompt (chance: 0.5).

Every recipe trains the bundled SmolLM2-135M with 20 virtual tokens for `--steps` steps of `--batch-size`
examples, the same batches in the same order, bf16 (base weights bf16 under autocast, the adapter and
AdamW state fp32):

    deltaw default                 `deltaw train --method prefix --lr 1e-2`: prefixes start as the base model's
                                   keys/values of the first training tokens; deltaw's defaults otherwise
    deltaw projection              `deltaw train --method prefix --prefix-projection --projection-hidden 512
                                   --lr 1e-3`, deltaw's defaults otherwise
    PEFT projection                PrefixTuningConfig(prefix_projection=True, encoder_hidden_size=512), as a
                                   PEFT user trains it: AdamW lr 1e-3 (PyTorch's defaults: weight decay 0.01),
                                   constant learning rate, no clipping
    PEFT no projection             PrefixTuningConfig(), the same loop at lr 1e-2

Every adapter is saved in PEFT's layout, then read back by one evaluator (deltaw's load_adapter), so all
recipes are scored by the same code; PEFT scores the deltaw default's file too (PeftModel.from_pretrained),
a cross-check of the evaluator.

    .venv/bin/python bench/prefix_recipes.py [--steps 300] [--batch-size 8] [--threads 1] [--out prefix-recipes]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import deltaw  # noqa: E402
from deltaw.adapters.prefix import PrefixConfig  # noqa: E402
from deltaw.train import TrainConfig, train  # noqa: E402
from deltaw.train.data import collate, load_jsonl  # noqa: E402
from deltaw.train.loop import BatchOrder  # noqa: E402
from deltaw.train.metrics import read_metrics  # noqa: E402
from sentiment_data import LABELS, write_split  # noqa: E402

warnings.filterwarnings("ignore")
TOKENS, HIDDEN, SEQ_LEN = 20, 512, 256


@dataclass(frozen=True)
class Recipe:
    """One way to train the prefix: `framework` deltaw (TrainConfig `settings`) or peft (the loop below)."""

    name: str
    framework: str
    lr: float
    projection: bool
    settings: dict = field(default_factory=dict)


RECIPES = {
    "deltaw-default": Recipe("deltaw default (activation init, lr 1e-2)", "deltaw", 1e-2, False),
    "deltaw-projection": Recipe("deltaw --prefix-projection (lr 1e-3)", "deltaw", 1e-3, True),
    "peft-projection": Recipe("PEFT prefix_projection (lr 1e-3)", "peft", 1e-3, True),
    "peft": Recipe("PEFT without projection (lr 1e-2)", "peft", 1e-2, False),
}


def train_deltaw(recipe: Recipe, data: Path, out: Path, args: argparse.Namespace) -> list[float]:
    """`deltaw train` with the recipe's settings; returns the step losses."""
    prefix = PrefixConfig(num_virtual_tokens=TOKENS, projection=recipe.projection, projection_hidden=HIDDEN)
    config = TrainConfig(data=str(data), out=str(out), method="prefix", prefix=prefix, steps=args.steps,
                         batch_size=args.batch_size, lr=recipe.lr, seq_len=SEQ_LEN, seed=args.seed, progress=False,
                         **recipe.settings)
    train(config)
    return [record["loss"] for record in read_metrics(out / "metrics.jsonl")]


def train_peft(recipe: Recipe, data: Path, out: Path, args: argparse.Namespace) -> list[float]:
    """PEFT's prefix-tuning in a plain loop (AdamW, constant lr, no clipping) over deltaw's batches."""
    import peft

    torch.manual_seed(args.seed)
    model, tokenizer = deltaw.load_model(deltaw.BUNDLED_NAME, dtype=torch.bfloat16)
    model.config.use_cache = False
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=TOKENS,
                                     prefix_projection=recipe.projection, encoder_hidden_size=HIDDEN)
    model = peft.get_peft_model(model, config)
    examples = load_jsonl(data, tokenizer, SEQ_LEN).examples
    order = BatchOrder(len(examples), args.batch_size, args.seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=recipe.lr)
    model.train()
    losses = []
    for step in range(args.steps):
        batch = collate([examples[i] for i in order.batch(step)], tokenizer.eos_token_id)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.save_pretrained(str(out))
    return losses


def test_batches(tokenizer, path: Path, size: int = 16):
    """Left-padded batches of the test prompts: (input_ids [B, T], attention_mask [B, T], labels [B])."""
    rows = [json.loads(line) for line in open(path, encoding="utf-8")]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for start in range(0, len(rows), size):
        chunk = rows[start : start + size]
        ids = [tokenizer(row["prompt"], add_special_tokens=False)["input_ids"] for row in chunk]
        longest = max(map(len, ids))
        input_ids = torch.tensor([[pad] * (longest - len(row)) + row for row in ids])
        mask = torch.tensor([[0] * (longest - len(row)) + [1] * len(row) for row in ids])
        yield input_ids, mask, torch.tensor([LABELS.index(row["completion"]) for row in chunk])


@torch.no_grad()
def accuracy(forward, tokenizer, path: Path) -> float:
    """The share of test prompts whose right label token outscores the other; forward(ids, mask) -> logits."""
    label_ids = [tokenizer(label, add_special_tokens=False)["input_ids"] for label in LABELS]
    assert all(len(ids) == 1 for ids in label_ids), f"each label must be one token: {label_ids}"
    label_ids = [ids[0] for ids in label_ids]
    correct = total = 0
    for input_ids, mask, labels in test_batches(tokenizer, path):
        logits = forward(input_ids, mask)[:, -1, label_ids]
        correct += int((logits.argmax(-1) == labels).sum())
        total += len(labels)
    return correct / total


def deltaw_accuracies(adapters: dict[str, Path], test: Path) -> dict[str, float]:
    """Every adapter read back by deltaw's load_adapter onto one bf16 model and scored; "base": no adapter."""
    model, tokenizer = deltaw.load_model(deltaw.BUNDLED_NAME, dtype=torch.bfloat16)
    model.eval()

    def forward(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits

    scores = {"base": accuracy(forward, tokenizer, test)}  # before any adapter is loaded
    for key, path in adapters.items():
        deltaw.load_adapter(model, path, key)
        deltaw.set_adapter(model, key)
        scores[key] = accuracy(forward, tokenizer, test)
    return scores


def peft_accuracy(path: Path, test: Path) -> float:
    """The adapter in `path` scored through PEFT's PeftModel (positions counted over the mask)."""
    import peft

    model, tokenizer = deltaw.load_model(deltaw.BUNDLED_NAME, dtype=torch.bfloat16)
    model = peft.PeftModel.from_pretrained(model, str(path)).eval()

    def forward(ids, mask):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits

    return accuracy(forward, tokenizer, test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--train", type=int, default=2400, help="training snippets")
    parser.add_argument("--test", type=int, default=400, help="test snippets")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--out", type=Path, default=Path("prefix-recipes"))
    args = parser.parse_args()
    run(args, {key: RECIPES[key] for key in args.recipes})


def run(args: argparse.Namespace, recipes: dict[str, Recipe]) -> None:
    """Train every recipe, score every adapter, print the table."""
    torch.set_num_threads(args.threads)
    shutil.rmtree(args.out, ignore_errors=True)
    train_file, test_file = write_split(args.out / "data", args.train, args.test, args.seed)
    trained, adapters = {}, {}
    for key, recipe in recipes.items():
        start = time.perf_counter()
        adapters[key] = args.out / key
        trainer = train_deltaw if recipe.framework == "deltaw" else train_peft
        losses = trainer(recipe, train_file, adapters[key], args)
        trained[key] = {"losses": losses, "seconds": time.perf_counter() - start}
        print(f"[{recipe.name}] {len(losses)} steps in {trained[key]['seconds']:.0f} s, loss {losses[0]:.3f} -> "
              f"{statistics.mean(losses[-20:]):.3f} (mean of the last 20), highest after step 10: "
              f"{max(losses[10:], default=float('nan')):.3f}", flush=True)
    scores = deltaw_accuracies(adapters, test_file)
    cross = peft_accuracy(adapters["deltaw-default"], test_file) if "deltaw-default" in adapters else None
    import peft

    print(f"\nbundled SmolLM2-135M, {TOKENS} virtual tokens, {args.steps} steps x batch {args.batch_size}, bf16; "
          f"{args.train} training / {args.test} test snippets; {args.threads} threads, torch {torch.__version__}, "
          f"peft {peft.__version__}\n")
    print("| recipe | accuracy | loss: first -> last 20 steps | highest loss after step 10 |")
    print("|---|---|---|---|")
    print(f"| base model, no adapter | {scores['base']:.3f} | – | – |")
    for key, recipe in recipes.items():
        losses = trained[key]["losses"]
        extra = f" (PEFT scoring the same file: {cross:.3f})" if key == "deltaw-default" else ""
        print(f"| {recipe.name} | {scores[key]:.3f}{extra} | {losses[0]:.3f} -> {statistics.mean(losses[-20:]):.3f} | "
              f"{max(losses[10:], default=float('nan')):.3f} |", flush=True)


if __name__ == "__main__":
    main()
