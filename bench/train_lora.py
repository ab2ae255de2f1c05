"""LoRA training step: deltaw vs PEFT on the bundled SmolLM2-135M, side by side in one run.

Same model, same LoRA (r=16, alpha=32, all linear layers), same batches (4 x 256 tokens of the persona
data, loss on every token), same optimizer (AdamW, lr 1e-4), in bf16 and fp32. deltaw runs as `deltaw train` does: its loss
(`deltaw.train.losses`), its attention choice (`deltaw.train.loop.choose_attention`: eager for bf16 on CPU at this
length) and its allocator setting (`deltaw.runtime.tune_malloc_for_reuse`). PEFT runs as a PEFT user
gets it ("peft"), and once more with deltaw's two process settings applied ("peft+settings"), to
show how much of the difference those settings alone explain. Each measurement round
runs one deltaw worker and one PEFT worker process, alternating; a worker loads the model, takes
warm-up steps, then times steps and reports its peak resident memory (VmHWM), so memory figures
are per framework, not mixed. bf16 means: base weights bf16 and autocast bf16, adapter weights and
optimizer state fp32, for both.

    .venv/bin/python bench/train_lora.py [--rounds 2] [--steps 4] [--warmup 2] [--threads N] [--dtypes bf16 fp32]

CPU s/step is the worker's process time per step: on a machine shared with other work it grows far
less than wall time, so its ratio is the steadier comparison when the two disagree.
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

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[1]
BATCH, SEQ = 4, 256


def batches(tokenizer, count: int) -> list[dict[str, torch.Tensor]]:
    """`count` batches of 4 x 256 tokens packed from the persona chats (labels = inputs)."""
    ids: list[int] = []
    for line in (ROOT / "examples" / "personas" / "pirate.jsonl").read_text().splitlines():
        messages = json.loads(line)["messages"]
        ids += tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    flat = torch.tensor(ids[: count * BATCH * SEQ]).view(count, BATCH, SEQ)
    return [{"input_ids": b, "attention_mask": torch.ones_like(b), "labels": b.clone()} for b in flat]


def peak_rss_kib() -> int:
    """This process's peak resident memory. VmHWM, not ru_maxrss, which Linux carries across execve from
    the forking parent."""
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("VmHWM")).split()[1])


def prepared(framework: str, dtype_name: str, count: int) -> tuple[torch.nn.Module, list[dict], torch.dtype]:
    """The bundled model in `dtype_name`, `count` batches, and, for "deltaw" and "peft+settings", deltaw's
    allocator setting and attention choice (and for "deltaw", its fused RMSNorm, as `deltaw train` runs)."""
    import deltaw
    from deltaw.runtime import tune_malloc_for_reuse
    from deltaw.train.fused_norm import fuse_norms
    from deltaw.train.loop import choose_attention

    if framework in ("deltaw", "peft+settings"):
        tune_malloc_for_reuse()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    model, tokenizer = deltaw.load_model(deltaw.BUNDLED_NAME, dtype=dtype)
    model.config.use_cache = False
    if framework in ("deltaw", "peft+settings"):
        choose_attention(model, SEQ, dtype_name)
    if framework == "deltaw":
        fuse_norms(model)
    return model, batches(tokenizer, count), dtype


def worker(framework: str, dtype_name: str, steps: int, warmup: int) -> dict:
    model, data, dtype = prepared(framework, dtype_name, steps + warmup)
    model, loss_of = with_lora(model, framework.startswith("deltaw"))
    params = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in params) == 4_884_480 and all(p.dtype == torch.float32 for p in params)
    return timed_steps(model, loss_of, data, dtype, warmup, lr=1e-4)


def with_lora(model, ours: bool):
    """(model, loss_of): r=16 alpha=32 all-linear LoRA with deltaw's add_lora and chunked loss when `ours`,
    else PEFT's get_peft_model and the model's own loss."""
    import deltaw
    from deltaw.train.losses import lm_loss_sum

    if ours:
        deltaw.add_lora(model, deltaw.LoRAConfig(rank=16, alpha=32), dtype=torch.float32)

        def loss_of(batch):
            total, count = lm_loss_sum(model, batch)
            return total / count

        return model, loss_of
    import peft

    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    return model, lambda batch: model(**batch).loss


def timed_steps(model, loss_of, data: list[dict], dtype: torch.dtype, warmup: int, lr: float) -> dict:
    """AdamW steps over `data` (autocast bf16 for a bf16 model); the wall and CPU seconds of the steps
    after `warmup`, every loss, and the process's peak resident memory (MiB)."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == torch.bfloat16 else nullcontext()
    times, cpu_times, losses = [], [], []
    for index, batch in enumerate(data):
        start, cpu_start = time.perf_counter(), time.process_time()
        with autocast:
            loss = loss_of(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        losses.append(loss.item())
        if index >= warmup:
            times.append(elapsed)
            cpu_times.append(cpu)
    return {"times": times, "cpu_times": cpu_times, "losses": losses, "peak_mib": peak_rss_kib() / 1024}


def compare(script: str, frameworks: list[str], args: argparse.Namespace, baseline: str = "peft") -> None:
    """Run `script`'s workers (one process each) for every dtype and round, alternating frameworks, and
    print one table row per framework: medians of the timed steps, ratios against `baseline`."""
    print("| dtype | framework | s/step (median) | tokens/s | CPU s/step | peak RSS (MiB) | first-step loss "
          f"| tokens/s vs {baseline} | CPU time vs {baseline} |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dtype in args.dtypes:
        results: dict[str, list[dict]] = {framework: [] for framework in frameworks}
        for _ in range(args.rounds):
            for framework in results:
                command = [sys.executable, script, "--worker", framework, dtype, "--steps", str(args.steps),
                           "--warmup", str(args.warmup), "--threads", str(args.threads)]
                output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
                results[framework].append(json.loads(output.strip().splitlines()[-1]))
        wall = {f: statistics.median(t for r in rs for t in r["times"]) for f, rs in results.items()}
        cpu = {f: statistics.median(t for r in rs for t in r["cpu_times"]) for f, rs in results.items()}
        for framework, runs in results.items():
            print(f"| {dtype} | {framework} | {wall[framework]:.2f} | {BATCH * SEQ / wall[framework]:,.0f} | "
                  f"{cpu[framework]:.2f} | {max(r['peak_mib'] for r in runs):,.0f} | {runs[0]['losses'][0]:.4f} | "
                  f"{wall[baseline] / wall[framework]:.2f}x | {cpu[baseline] / cpu[framework]:.2f}x |", flush=True)


def bench_arguments(description: str) -> argparse.Namespace:
    """The flags both training benchmarks take; a worker process also sets its torch threads here."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per worker")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads per worker")
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    parser.add_argument("--worker", nargs=2, metavar=("FRAMEWORK", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args


def main() -> None:
    args = bench_arguments(__doc__.splitlines()[0])
    if args.worker:
        print(json.dumps(worker(*args.worker, args.steps, args.warmup)))
        return
    import peft

    print(f"bundled SmolLM2-135M, LoRA r=16 alpha=32 all-linear, batch {BATCH}x{SEQ} tokens, AdamW; "
          f"{args.rounds} alternating rounds x {args.steps} timed steps after {args.warmup} warm-up steps per worker; "
          f"{args.threads} threads, torch {torch.__version__}, peft {peft.__version__}\n")
    compare(__file__, ["deltaw", "peft", "peft+settings"], args)


if __name__ == "__main__":
    main()
