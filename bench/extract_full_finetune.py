"""Does a rank-16 adapter extracted from a full fine-tune keep its gain? (deltaw extract, issue check)

    .venv/bin/python bench/extract_full_finetune.py [--steps 30] [--rank 16]

1. Full-parameter fine-tune of the bundled SmolLM2-135M on the pirate persona data (90% of it;
   AdamW over every parameter, fp32 weights, bf16 autocast), saved as an HF directory.
2. `deltaw extract` of that model against the base at rank 16 (and by energy 0.9).
3. Validation loss on the held-out 10% for the base, the fine-tune, and base + extracted adapter;
   the share of the fine-tune's validation-loss gain the adapter keeps (target >= 90%).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import deltaw
from deltaw.train.data import load_jsonl, split_validation
from deltaw.train.losses import lm_loss_sum
from deltaw.tools.svdtools import extract_adapter
from deltaw.train.loop import BatchOrder, evaluate

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-5)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = deltaw.load_model(deltaw.BUNDLED_NAME)
    examples = load_jsonl(ROOT / "examples" / "personas" / "pirate.jsonl", tokenizer, 256).examples
    train_set, val_set = split_validation(examples, 0.1, seed=0)
    pad = tokenizer.pad_token_id
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    base_loss = evaluate(model, val_set, 8, pad, autocast)

    start = time.perf_counter()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    order = BatchOrder(len(train_set), 8, seed=0)
    from deltaw.train.data import collate

    for step in range(args.steps):
        with autocast:
            total, count = lm_loss_sum(model, collate([train_set[i] for i in order.batch(step)], pad))
        (total / count).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    tuned_loss = evaluate(model, val_set, 8, pad, autocast)
    print(f"full fine-tune: {args.steps} steps in {time.perf_counter() - start:.0f} s")

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(f"{tmp}/tuned")
        del model, optimizer
        rows = []
        for label, kwargs in ((f"rank {args.rank}", {"rank": args.rank}), ("energy 0.9", {"energy": 0.9})):
            report = extract_adapter(deltaw.BUNDLED_NAME, f"{tmp}/tuned", f"{tmp}/{label}", progress=False, **kwargs)
            base, _ = deltaw.load_model(deltaw.BUNDLED_NAME)
            deltaw.load_adapter(base, f"{tmp}/{label}", "x")
            deltaw.set_adapter(base, "x")
            loss = evaluate(base, val_set, 8, pad, autocast)
            size = sum(f.stat().st_size for f in Path(f"{tmp}/{label}").iterdir())
            ranks = sorted({layer.rank for layer in report.layers})
            rows.append((label, loss, report.rel_error, f"{ranks[0]}..{ranks[-1]}", size, report.notes))
    gain = base_loss - tuned_loss
    print(f"\nvalidation loss on {len(val_set)} held-out pirate chats: base {base_loss:.4f}, "
          f"full fine-tune {tuned_loss:.4f} (gain {gain:.4f})\n")
    print("| extracted adapter | ranks | relative error of ΔW | size on disk | validation loss | gain kept |")
    print("|---|---|---|---|---|---|")
    for label, loss, error, ranks, size, _ in rows:
        print(f"| {label} | {ranks} | {error:.3f} | {size / 2**20:.1f} MiB | {loss:.4f} | {(base_loss - loss) / gain:.1%} |")
    for note in rows[0][5]:
        print(note)


if __name__ == "__main__":
    main()
