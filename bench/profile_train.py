"""Where a training step's time goes: torch.profiler, op by op, on the bundled model (deltaw, bf16 or fp32).

The same step as bench/train_lora.py (r=16 all-linear LoRA, 4x256 tokens, AdamW) or bench/qlora.py (NF4 base)
or bench/prefix.py (20 virtual tokens); after warm-up steps, `--steps` steps are profiled and the ops are
printed by self CPU time (the top `--top`), with the share of the step each takes.

    .venv/bin/python bench/profile_train.py [--kind lora|qlora|prefix] [--dtype bf16] [--threads 1] [--top 25]
"""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_lora import prepared  # noqa: E402


def step_function(kind: str, dtype_name: str):
    """(one training step as a function of a batch, the batches) for deltaw's `kind` of adapter."""
    import deltaw
    from deltaw.train.losses import lm_loss_sum

    model, data, dtype = prepared("deltaw", dtype_name, 8)
    if kind == "qlora":
        from deltaw.models.quantized import quantize_model

        quantize_model(model)
    if kind == "prefix":
        deltaw.add_prefix(model, deltaw.PrefixConfig(num_virtual_tokens=20))
    else:
        deltaw.add_lora(model, deltaw.LoRAConfig(rank=16, alpha=32), dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == torch.bfloat16 else nullcontext()

    def step(batch: dict[str, torch.Tensor]) -> float:
        with autocast:
            total, count = lm_loss_sum(model, batch)
            loss = total / count
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step, data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", default="lora", choices=["lora", "qlora", "prefix"])
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    step, data = step_function(args.kind, args.dtype)
    for batch in data[: args.warmup]:
        step(batch)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in data[args.warmup: args.warmup + args.steps]:
            step(batch)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / args.steps / 1e6
    print(f"deltaw {args.kind} {args.dtype}, {args.threads} threads: {total:.3f} s of self CPU time a step "
          f"(profiler overhead included)\n")
    print("| op | calls/step | self s/step | share |")
    print("|---|---|---|---|")
    for event in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]:
        seconds = event.self_cpu_time_total / args.steps / 1e6
        print(f"| {event.key} | {event.count // args.steps} | {seconds:.3f} | {seconds / total:.1%} |")


if __name__ == "__main__":
    main()
