"""Prefix-tuning training step: deltaw vs PEFT on the bundled SmolLM2-135M, side by side in one run.

Same model, same prefix (20 virtual tokens per layer and key/value head: 230,400 trainable values,
N(0, 1) init for both), same batches (4 x 256 tokens of the persona data, loss on every token), same
optimizer (AdamW, lr 1e-2), in bf16 and fp32. deltaw runs as `deltaw train --method prefix` does: its
loss (`deltaw.losses`), its attention choice (`deltaw.train.choose_attention`) and its allocator setting
(`deltaw.runtime.tune_malloc_for_reuse`); its prefixes enter at the attention interface. PEFT runs as a
PEFT user gets it (`PrefixTuningConfig(num_virtual_tokens=20)`: the prefixes enter as a KV cache), and
once more with deltaw's attention choice and allocator setting applied ("peft+settings"), to show how
much of the difference those settings alone explain. Each
round runs one worker process per framework, alternating; a worker loads the model, takes warm-up
steps, then times steps and reports its peak resident memory (VmHWM). bf16 means: base weights bf16
and autocast bf16, prefix parameters and optimizer state fp32, for both.

    .venv/bin/python bench/prefix.py [--rounds 2] [--steps 4] [--warmup 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_lora import BATCH, SEQ, batches, peak_rss_kib  # noqa: E402

warnings.filterwarnings("ignore")
TOKENS = 20
PREFIX_VALUES = 230_400  # 20 tokens x 30 layers x (key, value) x 3 kv heads x 64


def attach(framework: str, model, dtype_name: str):
    """Add a 20-token prefix the way `framework` does; returns (model, loss of a batch)."""
    if framework == "deltaw":
        from deltaw.config import PrefixConfig
        from deltaw.losses import lm_loss_sum
        from deltaw.prefix import add_prefix
        from deltaw.train import choose_attention

        choose_attention(model, SEQ, dtype_name)
        add_prefix(model, PrefixConfig(num_virtual_tokens=TOKENS), dtype=torch.float32)

        def loss_of(batch):
            total, count = lm_loss_sum(model, batch)
            return total / count

        return model, loss_of
    import peft

    if framework == "peft+settings":
        from deltaw.train import choose_attention

        choose_attention(model, SEQ, dtype_name)
    model = peft.get_peft_model(model, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=TOKENS))
    return model, lambda batch: model(**batch).loss


def worker(framework: str, dtype_name: str, steps: int, warmup: int) -> dict:
    import deltaw
    from deltaw.runtime import tune_malloc_for_reuse

    if framework in ("deltaw", "peft+settings"):
        tune_malloc_for_reuse()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    model, tokenizer = deltaw.load_model(deltaw.BUNDLED_NAME, dtype=dtype)
    model.config.use_cache = False
    data = batches(tokenizer, steps + warmup)
    model, loss_of = attach(framework, model, dtype_name)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in params) == PREFIX_VALUES and all(p.dtype == torch.float32 for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == torch.bfloat16 else nullcontext()
    times, losses = [], []
    for index, batch in enumerate(data):
        start = time.perf_counter()
        with autocast:
            loss = loss_of(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        losses.append(loss.item())
        if index >= warmup:
            times.append(elapsed)
    return {"times": times, "losses": losses, "peak_mib": peak_rss_kib() / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per worker")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    parser.add_argument("--worker", nargs=2, metavar=("FRAMEWORK", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.steps, args.warmup)))
        return
    import peft

    print(f"bundled SmolLM2-135M, prefix-tuning {TOKENS} virtual tokens ({PREFIX_VALUES:,} trainable), batch "
          f"{BATCH}x{SEQ} tokens, AdamW; {args.rounds} alternating rounds x {args.steps} timed steps after "
          f"{args.warmup} warm-up steps per worker; {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"peft {peft.__version__}\n")
    print("| dtype | framework | s/step (median) | tokens/s | peak RSS (MiB) | first-step loss | tokens/s vs PEFT |")
    print("|---|---|---|---|---|---|---|")
    for dtype in args.dtypes:
        results: dict[str, list[dict]] = {"deltaw": [], "peft": [], "peft+settings": []}
        for _ in range(args.rounds):
            for framework in results:
                command = [sys.executable, __file__, "--worker", framework, dtype,
                           "--steps", str(args.steps), "--warmup", str(args.warmup)]
                output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
                results[framework].append(json.loads(output.strip().splitlines()[-1]))
        medians = {f: statistics.median(t for r in rs for t in r["times"]) for f, rs in results.items()}
        for framework, runs in results.items():
            step = medians[framework]
            print(f"| {dtype} | {framework} | {step:.2f} | {BATCH * SEQ / step:,.0f} | "
                  f"{max(r['peak_mib'] for r in runs):,.0f} | {runs[0]['losses'][0]:.4f} | "
                  f"{medians['peft'] / step:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
