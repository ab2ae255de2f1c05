"""One rank of the 2-process runs tests/integration/test_distributed.py checks (started by torchrun, gloo on CPU).

    torchrun --nproc-per-node 2 -m tests.integration.distributed_worker MODEL_DIR TIED_MODEL_DIR DATA OUT

Joins one process group and runs `deltaw train` (the CLI entry point, in this process) once per scenario,
so the ranks pay for starting Python and importing torch once; then checks how DDP and FSDP2 lay out a
model. Writes OUT/rank<r>.json: per scenario the exit code, stdout and stderr of this rank, and the layout.
The scenarios in ON_TIED train TIED_MODEL_DIR (the same tiny Llama with its head tied to its embedding).
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from deltaw import cli
from deltaw.models.loading import load_model
from deltaw.quant.linear import quantized_layers
from deltaw.train.config import TrainConfig
from deltaw.train.distributed import start_ranks
from deltaw.train.loop import attach_adapter
from deltaw.train.parallel import held_bytes, parallelize

COMMON = ["--steps", "6", "--lr", "5e-3", "--rank", "4", "--alpha", "8", "--dtype", "fp32", "--no-progress"]
# name -> flags; the same run without --fsdp in one process is the reference
SCENARIOS = {
    # 16 training examples (20, 4 held out) in micro-batches of 3: every epoch ends with a 1-example batch, so
    # rank 1 runs a zero-weight example there; grad_accum 2 accumulates under DDP's no_sync
    "ddp-lora": ["--batch-size", "3", "--grad-accum", "2", "--val-split", "0.2", "--val-every", "3"],
    "fsdp-lora": ["--batch-size", "2", "--grad-accum", "2", "--fsdp"],  # sharded gradients accumulate
    "fsdp-qlora": ["--method", "qlora", "--batch-size", "4", "--fsdp", "--gradient-checkpointing"],
    "ddp-prefix": ["--method", "prefix", "--batch-size", "4"],
    # the newer adapter kinds under FSDP2: DoRA's magnitudes on a sharded NF4 base, embedding LoRA and trainable
    # token rows on a sharded embedding that a tied head shares, prefixes with and without their MLP
    "fsdp-qlora-dora": ["--method", "qlora", "--use-dora", "--batch-size", "4", "--fsdp"],
    "fsdp-embedding": ["--targets", ".*embed_tokens", ".*q_proj", "--batch-size", "4", "--fsdp"],
    "fsdp-tokens": ["--trainable-tokens", "<|im_start|>,<|im_end|>", "--batch-size", "4", "--fsdp"],
    "fsdp-prefix": ["--method", "prefix", "--batch-size", "4", "--fsdp"],
    "fsdp-prefix-projection": ["--method", "prefix", "--prefix-projection", "--projection-hidden", "16",
                               "--batch-size", "4", "--fsdp"],
}
ON_TIED = {"fsdp-embedding", "fsdp-tokens"}
# name -> flags of a one-process run the test rewinds to its step-3 checkpoint; the 2 ranks resume it
RESUMED = {
    "resume-1-on-2": ["--batch-size", "4", "--save-every", "3"],
    "resume-1-on-2-fsdp": ["--batch-size", "4", "--save-every", "3", "--fsdp"],
}
# name -> flags of runs that must stop on every rank with a clear error (DATA is replaced per rank)
FAILURES = {
    "batch-below-world": ["--batch-size", "1"],
    "data-missing-on-rank-1": ["--batch-size", "4"],
}


def argv(model: str, data: str, out: Path, flags: list[str]) -> list[str]:
    return ["train", "--model", model, "--data", data, "--out", str(out), *COMMON, *flags]


def model_for(name: str, model: str, tied: str) -> str:
    """The model scenario `name` trains: `tied` for those in ON_TIED, else `model`."""
    return tied if name in ON_TIED else model


def run_cli(arguments: list[str]) -> dict:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli.main(arguments)
    return {"code": code, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}


def layouts(model_dir: str) -> dict:
    """What this rank holds of a QLoRA model under FSDP2, and what DDP reduces of a LoRA model."""
    ranks = start_ranks("cpu", 60)
    model, _ = load_model(model_dir)
    attach_adapter(model, TrainConfig(data="-", out="-", model=model_dir, method="qlora"))
    nf4 = quantized_layers(model)
    packed_whole, whole = sum(weight.packed.numel() for weight in nf4.values()), held_bytes(model)
    parallelize(model, ranks, fsdp=True)
    packed_local, local = sum(weight.packed.to_local().numel() for weight in nf4.values()), held_bytes(model)
    model, _ = load_model(model_dir)
    attach_adapter(model, TrainConfig(data="-", out="-", model=model_dir))
    wrapped = parallelize(model, ranks, fsdp=False)
    reduced = {id(p) for p in wrapped._module_parameters}
    return {
        "packed_whole": packed_whole, "packed_local": packed_local, "held_whole": whole, "held_local": local,
        "ddp_reduced": sorted(name for name, p in wrapped.module.named_parameters() if id(p) in reduced),
        "trainable": sorted(name for name, p in wrapped.module.named_parameters() if p.requires_grad),
    }


def main(model: str, tied: str, data: str, out: str) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, root = dist.get_rank(), Path(out)
    results = {name: run_cli(argv(model_for(name, model, tied), data, root / name, flags))
               for name, flags in SCENARIOS.items()}
    for name, flags in RESUMED.items():
        results[name] = run_cli(argv(model, data, root / name, [*flags, "--resume"]))
    for name, flags in FAILURES.items():
        own_data = data if name != "data-missing-on-rank-1" or rank == 0 else str(root / "missing.jsonl")
        results[name] = run_cli(argv(model, own_data, root / name, flags))
    results["layout"] = layouts(model)
    (root / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:5])
