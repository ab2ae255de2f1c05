"""Scale-out training: 1 process x 2 threads vs 2 processes x 1 thread (torchrun, gloo) on the bundled SmolLM2-135M.

The same `deltaw train` run each time (persona data packed to 256 tokens, global batch 8 per step, r=16
all-linear, bf16), as one process with 2 threads, and under `torchrun --nproc-per-node 2` with one thread per
rank, replicated (DDP) and sharded (--fsdp), for LoRA and QLoRA. A round runs every configuration once,
alternating; tokens/s is the median over the timed steps of all rounds (metrics.jsonl: all ranks' tokens
per second of wall time). Memory is per rank: the bytes of frozen base it holds between steps (its shards
under FSDP), and the peak resident set during training steps (VmHWM, reset at the first step, so the load,
where every rank holds the whole base before FSDP shards it, is left out), the largest over ranks, next to
what `deltaw plan --world-size N [--fsdp]` predicts. With 2 or more CUDA
devices it also compares 1 GPU with all of them (--device cuda).

    .venv/bin/python bench/distributed.py [--rounds 2] [--steps 8] [--warmup 3] [--methods lora qlora]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "personas" / "pirate.jsonl"
BATCH, SEQ = 8, 256


def status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith(field)).split()[1])


def rank_worker(arguments: list[str]) -> None:
    """One rank (or the one process): `deltaw train`, resetting the peak-memory mark at the first step; prints
    {"rank", "load_peak_mib", "base_held_mib", "cpu_s" (per step), "train_peak_mib"} as its last line."""
    from deltaw import cli
    from deltaw.train import loop
    from deltaw.train.parallel import held_bytes

    real, marks = loop._train_step, {}

    def first_step_resets_the_peak(run):
        if not marks:
            marks.update(load_peak_mib=status_kib("VmHWM") / 1024, base_held_mib=held_bytes(run.model) / 2**20,
                         cpu_s=[])
            Path("/proc/self/clear_refs").write_text("5")
        start = time.process_time()
        record = real(run)
        marks["cpu_s"].append(time.process_time() - start)
        return record

    loop._train_step = first_step_resets_the_peak
    code = cli.main(arguments)
    assert code == 0, f"deltaw train exited with {code}"
    print(json.dumps({"rank": int(os.environ.get("RANK", 0)), **marks, "train_peak_mib": status_kib("VmHWM") / 1024}))


def configurations(methods: list[str], gpus: int) -> list[dict]:
    rows = []
    for method in methods:
        rows += [{"method": method, "processes": 1, "threads": 2, "fsdp": False, "device": "cpu"},
                 {"method": method, "processes": 2, "threads": 1, "fsdp": False, "device": "cpu"},
                 {"method": method, "processes": 2, "threads": 1, "fsdp": True, "device": "cpu"}]
        if gpus >= 2:
            rows += [{"method": method, "processes": n, "threads": 1, "fsdp": fsdp, "device": "cuda"}
                     for n, fsdp in ((1, False), (gpus, False), (gpus, True))]
    return rows


def run(config: dict, steps: int, out: Path) -> dict:
    """One `deltaw train` run as `config` says; its timed metrics and every rank's peaks."""
    train = ["train", "--data", str(DATA), "--out", str(out), "--method", config["method"], "--steps", str(steps),
             "--batch-size", str(BATCH), "--seq-len", str(SEQ), "--packing", "--dtype", "bf16", "--lr", "1e-4",
             "--device", config["device"], "--no-progress"] + (["--fsdp"] if config["fsdp"] else [])
    worker = [str(Path(__file__).resolve()), "--rank-worker", *train]
    if config["processes"] > 1 or config["fsdp"]:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                   str(config["processes"]), *worker]
    else:
        command = [sys.executable, *worker]
    env = {**os.environ, "OMP_NUM_THREADS": str(config["threads"]), "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{config}: exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    peaks = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"rank"')]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"records": records, "peaks": peaks}


def planned_mib(config: dict) -> float:
    from deltaw.tools.plan import model_plan

    plan = model_plan("smollm2-135m-instruct", rank=16, batch=BATCH, seq_len=SEQ, dtype="bf16",
                      world_size=config["processes"], fsdp=config["fsdp"])
    return plan.rows[1 if config["method"] == "lora" else 2].total / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the timing")
    parser.add_argument("--methods", nargs="+", default=["lora", "qlora"])
    args = parser.parse_args()
    import torch

    rows = configurations(args.methods, torch.cuda.device_count())
    results: list[list[dict]] = [[] for _ in rows]
    with tempfile.TemporaryDirectory() as scratch:
        for round_index in range(args.rounds):
            for index, config in enumerate(rows):
                results[index].append(run(config, args.steps, Path(scratch) / f"r{round_index}-{index}"))
    print(f"| method | device | processes x threads | parallelism | tokens/s (median) | vs 1 process "
          f"| CPU s/step, all ranks | base held per rank (MiB) | peak RSS per rank, training (MiB) | plan (MiB) "
          f"| loss at step {args.steps} |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    baseline: dict[tuple[str, str], float] = {}
    for config, runs in zip(rows, results):
        speed = statistics.median(r["tokens_per_s"] for run_ in runs for r in run_["records"][args.warmup:])
        key = (config["method"], config["device"])
        baseline.setdefault(key, speed)
        peak = statistics.median(max(p["train_peak_mib"] for p in run_["peaks"]) for run_ in runs)
        held = max(p["base_held_mib"] for p in runs[0]["peaks"])
        cpu = statistics.median(sum(ranks) for run_ in runs  # one step's CPU seconds over all ranks
                                for ranks in list(zip(*(p["cpu_s"] for p in run_["peaks"])))[args.warmup:])
        kind = "FSDP" if config["fsdp"] else ("DDP" if config["processes"] > 1 else "one process")
        print(f"| {config['method']} | {config['device']} | {config['processes']} x {config['threads']} | {kind} "
              f"| {speed:,.0f} | {speed / baseline[key]:.2f}x | {cpu:.2f} | {held:,.1f} | {peak:,.0f} "
              f"| {planned_mib(config):,.0f} "
              f"| {runs[0]['records'][-1]['loss']:.4f} |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--rank-worker":
        rank_worker(sys.argv[2:])
    else:
        main()
