"""QLoRA: deltaw (its own NF4) vs PEFT + bitsandbytes, side by side in one run, on the bundled SmolLM2-135M.

Training step: r=16 alpha=32 all-linear LoRA on an NF4 base (double quantization, blocks of 64), bf16
compute, batch 4 x 256 tokens of the persona data (loss on every token), AdamW lr 1e-4, adapter and
optimizer fp32. Workers alternate in separate processes (one deltaw QLoRA, one PEFT + bitsandbytes QLoRA,
one deltaw bf16 LoRA for the memory comparison); each loads the model, takes warm-up steps, times steps
and reports its peak resident memory (VmHWM) and the bytes its base weights hold. PEFT + bitsandbytes
loads the converted HF directory with BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=bfloat16).

Layer latency: forward + backward (gradient to the input) of one NF4 linear for the model's layer
shapes on 1024 tokens, deltaw's `linear_nf4` vs bitsandbytes' `Linear4bit`, with each one's error
against the exact dequantized weight.

    .venv/bin/python bench/qlora.py [--rounds 2] [--steps 4] [--warmup 2] [--threads N] [--device cpu|cuda]
        [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_lora import BATCH, SEQ, batches, peak_rss_kib, with_lora  # noqa: E402

warnings.filterwarnings("ignore")
SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]  # (out, in): q/o, k/v, gate/up, down


def base_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes held by the base model's weights: the quantized linear layers, and everything else."""
    from deltaw.quant.nf4 import NF4Weight

    quantized, other, seen = 0, 0, set()
    for module in model.modules():
        if isinstance(module, NF4Weight) or type(module).__name__ == "Linear4bit":
            tensors = list(module.buffers()) + list(module.parameters(recurse=False))
            state = getattr(getattr(module, "weight", None), "quant_state", None)
            if state is not None:
                tensors += [state.absmax, state.code] + ([state.state2.absmax, state.state2.code] if state.nested else [])
            fresh = [t for t in tensors if t.data_ptr() not in seen]
            seen.update(t.data_ptr() for t in fresh)
            quantized += sum(t.numel() * t.element_size() for t in fresh)
    for name, param in model.named_parameters():
        if param.data_ptr() not in seen and not param.requires_grad:
            seen.add(param.data_ptr())
            other += param.numel() * param.element_size()
    return {"quantized": quantized, "other": other}


def load(framework: str, device: str, model_name: str):
    import deltaw

    if framework == "peft+bnb":
        from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

        from deltaw.models.loading import resolve_model_dir

        directory = resolve_model_dir(model_name)
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(directory, quantization_config=config, dtype=torch.bfloat16,
                                                     device_map=device)
        return model, AutoTokenizer.from_pretrained(directory)
    model, tokenizer = deltaw.load_model(model_name, dtype=torch.bfloat16)
    return model.to(device), tokenizer


def worker(framework: str, steps: int, warmup: int, device: str, model_name: str) -> dict:
    from deltaw.models.quantized import quantize_model
    from deltaw.runtime import tune_malloc_for_reuse
    from deltaw.train.fused_norm import fuse_norms
    from deltaw.train.loop import choose_attention

    if framework.startswith("deltaw"):
        tune_malloc_for_reuse()
    model, tokenizer = load(framework, device, model_name)
    model.config.use_cache = False
    data = [{k: v.to(device) for k, v in b.items()} for b in batches(tokenizer, steps + warmup)]
    if framework.startswith("deltaw"):
        choose_attention(model, SEQ, "bf16")
        fuse_norms(model)
        if framework == "deltaw-qlora":
            quantize_model(model)
    model, loss_of = with_lora(model, framework.startswith("deltaw"))
    for param in model.parameters():  # PEFT gives a bnb layer's adapter the base's dtype: train fp32 in both
        if param.requires_grad:
            param.data = param.data.float()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    times, cpu_times, losses = [], [], []
    for index, batch in enumerate(data):
        start, cpu_start = time.perf_counter(), time.process_time()
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = loss_of(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        losses.append(loss.item())
        if index >= warmup:
            times.append(elapsed)
            cpu_times.append(cpu)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak_rss_kib() / 1024
    return {"times": times, "cpu_times": cpu_times, "losses": losses, "peak_mib": peak, "trainable": trainable,
            **base_bytes(model)}


def layer_latency(device: str, repeats: int = 20) -> list[dict]:
    """Median forward+backward time of one NF4 linear on 1024 tokens, deltaw vs bitsandbytes."""
    import bitsandbytes as bnb

    from deltaw.quant.nf4 import quantize
    from deltaw.quant.linear import linear_nf4

    rows = []
    for out_features, in_features in SHAPES:
        weight = torch.randn(out_features, in_features, device=device) * 0.02
        ours = quantize(weight).to(device)
        ours.dtype = torch.bfloat16
        theirs = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.bfloat16,
                                   quant_type="nf4", compress_statistics=True)
        theirs.weight = bnb.nn.Params4bit(weight.cpu(), requires_grad=False, quant_type="nf4",
                                          compress_statistics=True)
        theirs = theirs.to(device)
        x = torch.randn(1024, in_features, device=device, dtype=torch.bfloat16, requires_grad=True)
        exact = x.detach().float() @ ours.dequantize(torch.float32).t()
        result = {"shape": f"{out_features}x{in_features}"}
        for name, run in (("deltaw", lambda: linear_nf4(x, ours)), ("bitsandbytes", lambda: theirs(x))):
            result[f"{name}_error"] = (run().float() - exact).abs().max().item()
            times = []
            for _ in range(repeats + 3):
                start = time.perf_counter()
                run().sum().backward()
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            result[f"{name}_ms"] = 1e3 * statistics.median(times[3:])
        rows.append(result)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per worker")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="model to load (an HF directory with SmolLM2's shapes works for timing on a GPU machine)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads per worker")
    parser.add_argument("--worker", metavar="FRAMEWORK", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.warmup, args.device, args.model)))
        return
    import bitsandbytes
    import peft

    print(f"{args.model}, QLoRA r=16 alpha=32 all-linear, bf16 compute, batch {BATCH}x{SEQ}; {args.rounds} "
          f"alternating rounds x {args.steps} timed steps after {args.warmup} warm-up; device {args.device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, peft {peft.__version__}, "
          f"bitsandbytes {bitsandbytes.__version__}\n")
    results: dict[str, list[dict]] = {"deltaw-qlora": [], "peft+bnb": [], "deltaw-lora": []}
    for _ in range(args.rounds):
        for framework in results:
            command = [sys.executable, __file__, "--worker", framework, "--steps", str(args.steps),
                       "--warmup", str(args.warmup), "--device", args.device, "--model", args.model,
                       "--threads", str(args.threads)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"worker {framework} failed:\n{done.stderr[-3000:]}")
            output = done.stdout
            results[framework].append(json.loads(output.strip().splitlines()[-1]))
    medians = {f: statistics.median(t for r in rs for t in r["times"]) for f, rs in results.items()}
    cpu = {f: statistics.median(t for r in rs for t in r["cpu_times"]) for f, rs in results.items()}
    counts = {r["trainable"] for rs in results.values() for r in rs}
    assert len(counts) == 1, f"the runs train different parameter counts: {counts}"
    memory = "peak GPU memory" if args.device == "cuda" else "peak RSS"
    print(f"| run | s/step (median) | tokens/s | tokens/s vs PEFT+bnb | CPU s/step | CPU time vs PEFT+bnb "
          f"| {memory} (MiB) | quantized layers (MiB) | other base weights (MiB) | first-step loss |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for framework, runs in results.items():
        step, run = medians[framework], runs[0]
        print(f"| {framework} | {step:.2f} | {BATCH * SEQ / step:,.0f} | {medians['peft+bnb'] / step:.2f}x | "
              f"{cpu[framework]:.2f} | {cpu['peft+bnb'] / cpu[framework]:.2f}x | "
              f"{max(r['peak_mib'] for r in runs):,.0f} | {run['quantized'] / 2**20:,.1f} | "
              f"{run['other'] / 2**20:,.1f} | {run['losses'][0]:.4f} |")
    print("\n| layer (out x in) | deltaw fwd+bwd (ms) | bitsandbytes fwd+bwd (ms) | speed-up | deltaw max error "
          "| bitsandbytes max error |")
    print("|---|---|---|---|---|---|")
    for row in layer_latency(args.device):
        print(f"| {row['shape']} | {row['deltaw_ms']:.2f} | {row['bitsandbytes_ms']:.2f} | "
              f"{row['bitsandbytes_ms'] / row['deltaw_ms']:.2f}x | {row['deltaw_error']:.3g} | "
              f"{row['bitsandbytes_error']:.3g} |")


if __name__ == "__main__":
    main()
