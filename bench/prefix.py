"""Prefix-tuning training step: deltaw vs PEFT on the bundled SmolLM2-135M, side by side in one run.

Same model, same prefix (20 virtual tokens per layer and key/value head: 230,400 trainable values,
N(0, 1) init for both), same batches (4 x 256 tokens of the persona data, loss on every token), same
optimizer (AdamW, lr 1e-2), in bf16 and fp32. deltaw runs as `deltaw train --method prefix` does: its
loss (`deltaw.train.losses`), its attention choice (`deltaw.train.loop.choose_attention`) and its allocator setting
(`deltaw.runtime.tune_malloc_for_reuse`); its prefixes enter at the attention interface. PEFT runs as a
PEFT user gets it (`PrefixTuningConfig(num_virtual_tokens=20)`: the prefixes enter as a KV cache), and
once more with deltaw's attention choice and allocator setting applied ("peft+settings"), to show how
much of the difference those settings alone explain. Each
round runs one worker process per framework, alternating; a worker loads the model, takes warm-up
steps, then times steps and reports its peak resident memory (VmHWM). bf16 means: base weights bf16
and autocast bf16, prefix parameters and optimizer state fp32, for both.

    .venv/bin/python bench/prefix.py [--rounds 2] [--steps 4] [--warmup 2] [--threads N] [--dtypes bf16 fp32]
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
TOKENS = 20
PREFIX_VALUES = 230_400  # 20 tokens x 30 layers x (key, value) x 3 kv heads x 64


def attach(framework: str, model):
    """Add a 20-token prefix the way `framework` does; returns (model, loss of a batch)."""
    torch.manual_seed(0)  # both draw the prefixes N(0, 1) from here: the same values
    if framework == "deltaw":
        from deltaw.adapters.prefix import PrefixConfig
        from deltaw.train.losses import lm_loss_sum
        from deltaw.adapters.prefix import add_prefix

        add_prefix(model, PrefixConfig(num_virtual_tokens=TOKENS), dtype=torch.float32)

        def loss_of(batch):
            total, count = lm_loss_sum(model, batch)
            return total / count

        return model, loss_of
    import peft

    model = peft.get_peft_model(model, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=TOKENS))
    return model, lambda batch: model(**batch).loss


def worker(framework: str, dtype_name: str, steps: int, warmup: int) -> dict:
    model, data, dtype = prepared(framework, dtype_name, steps + warmup)
    model, loss_of = attach(framework, model)
    params = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in params) == PREFIX_VALUES and all(p.dtype == torch.float32 for p in params)
    return timed_steps(model, loss_of, data, dtype, warmup, lr=1e-2)


def main() -> None:
    args = bench_arguments(__doc__.splitlines()[0])
    if args.worker:
        print(json.dumps(worker(*args.worker, args.steps, args.warmup)))
        return
    import peft

    print(f"bundled SmolLM2-135M, prefix-tuning {TOKENS} virtual tokens ({PREFIX_VALUES:,} trainable), batch "
          f"{BATCH}x{SEQ} tokens, AdamW; {args.rounds} alternating rounds x {args.steps} timed steps after "
          f"{args.warmup} warm-up steps per worker; {args.threads} threads, torch {torch.__version__}, "
          f"peft {peft.__version__}\n")
    compare(__file__, ["deltaw", "peft", "peft+settings"], args)


if __name__ == "__main__":
    main()
