"""DoRA training step: deltaw vs PEFT on the bundled SmolLM2-135M, and what DoRA costs over LoRA in each.

Same model, same adapter (r=16, alpha=32, all linear layers; DoRA adds a magnitude per output row: 4,884,480
+ 155,520 trainable values), same batches (4 x 256 tokens of the persona data, loss on every token), same
optimizer (AdamW, lr 1e-4), in bf16 and fp32. deltaw runs as `deltaw train --use-dora` does (its loss, its
attention choice and its allocator setting, as bench/train_lora.py); PEFT as a PEFT user gets it
(`LoraConfig(use_dora=True)`). Both frameworks also run plain LoRA in the same rounds, so each line's DoRA cost
is measured against its own LoRA under the same load. Each round runs one worker process per configuration,
alternating; a worker loads the model, takes warm-up steps, then times steps and reports its peak resident
memory (VmHWM). Ratios are against PEFT's DoRA.

    .venv/bin/python bench/dora.py [--rounds 2] [--steps 4] [--warmup 2] [--threads N] [--dtypes bf16 fp32]
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_lora import BATCH, SEQ, bench_arguments, compare, prepared, timed_steps  # noqa: E402

warnings.filterwarnings("ignore")
LORA_VALUES, MAGNITUDE_VALUES = 4_884_480, 155_520  # r=16 all-linear; 30 layers x 5,184 output rows
FRAMEWORKS = ["deltaw-dora", "peft-dora", "deltaw-lora", "peft-lora"]


def attach(framework: str, model):
    """The adapter `framework` names ("deltaw-dora", "peft-lora", ...); returns (model, loss of a batch)."""
    dora = framework.endswith("dora")
    if framework.startswith("deltaw"):
        import deltaw
        from deltaw.train.losses import lm_loss_sum

        deltaw.add_lora(model, deltaw.LoRAConfig(rank=16, alpha=32, use_dora=dora), dtype=torch.float32)

        def loss_of(batch):
            total, count = lm_loss_sum(model, batch)
            return total / count

        return model, loss_of
    import peft

    config = peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", use_dora=dora)
    model = peft.get_peft_model(model, config)
    for param in model.parameters():  # PEFT keeps the magnitude in the base dtype; train it in fp32 as deltaw does
        if param.requires_grad:
            param.data = param.data.float()
    return model, lambda batch: model(**batch).loss


def worker(framework: str, dtype_name: str, steps: int, warmup: int) -> dict:
    model, data, dtype = prepared("deltaw" if framework.startswith("deltaw") else "peft", dtype_name, steps + warmup)
    model, loss_of = attach(framework, model)
    params = [p for p in model.parameters() if p.requires_grad]
    expected = LORA_VALUES + (MAGNITUDE_VALUES if framework.endswith("dora") else 0)
    assert sum(p.numel() for p in params) == expected and all(p.dtype == torch.float32 for p in params)
    return timed_steps(model, loss_of, data, dtype, warmup, lr=1e-4)


def main() -> None:
    args = bench_arguments(__doc__.splitlines()[0])
    if args.worker:
        print(json.dumps(worker(*args.worker, args.steps, args.warmup)))
        return
    import peft

    print(f"bundled SmolLM2-135M, DoRA and LoRA r=16 alpha=32 all-linear, batch {BATCH}x{SEQ} tokens, AdamW; "
          f"{args.rounds} alternating rounds x {args.steps} timed steps after {args.warmup} warm-up steps per worker; "
          f"{args.threads} threads, torch {torch.__version__}, peft {peft.__version__}\n")
    compare(__file__, FRAMEWORKS, args, baseline="peft-dora")


if __name__ == "__main__":
    main()
