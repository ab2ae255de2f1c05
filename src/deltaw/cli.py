"""The `deltaw` command: one sub-command per task, each a thin layer over the Python API."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import torch

from deltaw.adapter import AdapterFormatError, describe_adapter, load_adapter
from deltaw.checkpoint import CheckpointError
from deltaw.config import PREFIX_INITS
from deltaw.data import DataError, load_jsonl
from deltaw.export import export_merged, unload
from deltaw.generation import chat_inputs, generate, load_with_adapters, parse_adapter_spec
from deltaw.manage import deactivate_adapters, list_adapters, set_adapter
from deltaw.models import BUNDLED_NAME, ModelLoadError, load_model
from deltaw.nf4_linear import quantized_layers
from deltaw.quantized import adapter_deltaw_config, merge_into_nf4, prepare_base, quantize_model, save_quantized
from deltaw.targets import TargetError
from deltaw.train import DTYPES as TRAIN_DTYPES
from deltaw.train import METHODS, SCHEDULES, TrainConfig, TrainingError, evaluate, train

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
USER_ERRORS = (AdapterFormatError, TargetError, ModelLoadError, DataError, TrainingError, CheckpointError,
               FileExistsError, FileNotFoundError, KeyError, ValueError)


def cmd_merge(args: argparse.Namespace) -> None:
    """Merge an adapter into its base model and write an HF model directory (or an NF4 one with --nf4)."""
    start = time.perf_counter()
    if args.val_data and not args.nf4:
        raise ValueError("--val-data measures the re-quantization of --nf4; add --nf4 or drop --val-data")
    deltaw_config = adapter_deltaw_config(args.adapter)
    record = deltaw_config.get("base_quantization")
    # A QLoRA adapter's base is rebuilt as in training: the same load dtype, then the same NF4 layers.
    model, tokenizer = load_model(args.model, dtype=DTYPES[record.get("dtype", "fp32")] if record else torch.float32)
    if record:
        prepare_base(model, record)
    elif args.nf4 and not quantized_layers(model):
        print(quantize_model(model))
    load_adapter(model, args.adapter, "merged", ignore_fingerprint=args.ignore_fingerprint)
    if args.nf4:
        _merge_nf4(model, tokenizer, args, deltaw_config.get("training", {}).get("seq_len", 512))
        return
    if quantized_layers(model):  # NF4 weights inside LoRA layers included
        print("merged into the dequantized NF4 base" + (" the adapter was trained on: no re-quantization error"
                                                         if record else f" of {args.model}"))
    out = export_merged(model, tokenizer, "merged", args.out, dtype=DTYPES[args.dtype], overwrite=args.overwrite)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"merged {args.adapter} into {args.model} -> {out} ({args.dtype}, {size / 2**20:.1f} MiB, "
          f"{time.perf_counter() - start:.1f} s)")
    print(f"load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")


def _merge_nf4(model: torch.nn.Module, tokenizer: object, args: argparse.Namespace, seq_len: int) -> None:
    """Merge into the NF4 base, re-quantize, report the error, write a quantized model directory."""
    examples = load_jsonl(args.val_data, tokenizer, seq_len=seq_len).examples if args.val_data else []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def val_loss() -> float:
        return evaluate(model, examples, 8, pad_id, contextlib.nullcontext())

    print(merge_into_nf4(model, "merged", val_loss if examples else None))
    unload(model)
    out = save_quantized(model, tokenizer, args.out, overwrite=args.overwrite)
    print(f"merged {args.adapter} into the NF4 base -> {out} (load it with deltaw.load_model({str(out)!r}))")


def cmd_quantize(args: argparse.Namespace) -> None:
    """Store a model's linear layers as NF4 and write it as a directory that load_model reads."""
    model, tokenizer = load_model(args.model, dtype=DTYPES[args.dtype])
    print(quantize_model(model, args.targets or "all-linear", args.exclude or (), args.blocksize,
                         not args.no_double_quant))
    out = save_quantized(model, tokenizer, args.out, overwrite=args.overwrite)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"-> {out} ({size / 2**20:.1f} MiB on disk); train on it with `deltaw train --model {out}`")


def cmd_inspect(args: argparse.Namespace) -> None:
    """Print an adapter's config, targets, ranks, size and base fingerprint."""
    print(describe_adapter(args.adapter))


def cmd_train(args: argparse.Namespace) -> None:
    """Train a LoRA or prefix adapter on a JSONL file."""
    fields = {f for f in TrainConfig.__dataclass_fields__}
    config = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields and v is not None})
    config.progress = not args.no_progress
    result = train(config)
    val = f", validation loss {result.final_val_loss:.4f}" if result.final_val_loss is not None else ""
    print(f"trained {result.steps} steps on {result.tokens:,} tokens in {result.seconds:.0f} s: loss "
          f"{result.final_loss:.4f}{val}\nadapter -> {result.out} (metrics.jsonl, loss.png, checkpoints/)")


def _start(model: torch.nn.Module, name: str | None) -> str | None:
    """Activate the adapter the user chose with --use (the only one loaded, if there is one)."""
    names = list_adapters(model)
    if name is None and len(names) > 1:
        raise ValueError(f"several adapters are loaded ({names}); choose one with --use NAME")
    name = name or (names[0] if names else None)
    if name is not None:
        set_adapter(model, name)
    return name


def cmd_generate(args: argparse.Namespace) -> None:
    """Generate a completion (or a chat answer with --chat), streamed to the terminal."""
    from transformers import TextStreamer

    model, tokenizer = load_with_adapters(args.model, args.adapter, DTYPES[args.dtype])
    _start(model, args.use)
    if args.chat:
        inputs = chat_inputs(tokenizer, [{"role": "user", "content": args.prompt}])
    else:
        inputs = tokenizer(args.prompt, return_tensors="pt")
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    generate(model, tokenizer, inputs, args.max_new_tokens, args.temperature, args.top_p, args.seed, streamer)


CHAT_HELP = "commands: /use NAME (switch adapter), /base (no adapter), /adapters (list), /reset (forget history), /quit"


def cmd_chat(args: argparse.Namespace) -> None:
    """An interactive chat whose adapter can be switched mid-conversation."""
    from transformers import TextStreamer

    model, tokenizer = load_with_adapters(args.model, args.adapter, DTYPES[args.dtype])
    current = _start(model, args.use)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    history: list[dict] = []
    print(f"chatting with {current or 'the base model'}; {CHAT_HELP}")
    while True:
        try:
            line = input(f"[{current or 'base'}] you> ").strip()
        except EOFError:
            print()
            return
        if not line:
            continue
        command, _, argument = line.partition(" ")
        if command in ("/quit", "/exit"):
            return
        if command == "/adapters":
            print("adapters: " + ", ".join(f"{n}{' (active)' if n == current else ''}" for n in list_adapters(model))
                  if list_adapters(model) else "no adapters loaded")
        elif command == "/base":
            deactivate_adapters(model)
            current = None
            print("now: the base model")
        elif command == "/use":
            try:
                set_adapter(model, argument.strip())
            except KeyError as exc:
                print(f"error: {exc.args[0]}")
                continue
            current = argument.strip()
            print(f"now: {current}")
        elif command == "/reset":
            history.clear()
            print("history cleared")
        elif command.startswith("/"):
            print(f"unknown command {command!r}; {CHAT_HELP}")
        else:
            history.append({"role": "user", "content": line})
            print(f"{current or 'base'}> ", end="", flush=True)
            reply = generate(model, tokenizer, chat_inputs(tokenizer, history), args.max_new_tokens,
                             args.temperature, args.top_p, args.seed, streamer)[0]
            history.append({"role": "assistant", "content": reply.strip()})


def _add_generation_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=BUNDLED_NAME, help=f"base model (default {BUNDLED_NAME})")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                        help="load an adapter under a name (repeatable)")
    parser.add_argument("--use", help="the adapter to start with (default: the only one loaded)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")


def _default(field: str) -> object:
    """TrainConfig's default for `field`: the one place training defaults are written."""
    return TrainConfig.__dataclass_fields__[field].default


def _add_train_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="training JSONL (messages / prompt+completion / text)")
    parser.add_argument("--out", required=True, help="output directory for the adapter, metrics and checkpoints")
    parser.add_argument("--model", default=BUNDLED_NAME, help=f"base model (default {BUNDLED_NAME})")
    parser.add_argument("--method", choices=METHODS, default=_default("method"), help="what to train")
    lora = parser.add_argument_group("LoRA (--method lora)")
    lora.add_argument("--rank", type=int, default=_default("rank"))
    lora.add_argument("--alpha", type=float, default=_default("alpha"))
    lora.add_argument("--dropout", type=float, default=_default("dropout"))
    lora.add_argument("--targets", nargs="+", default=None,
                      help="'all-linear' (default) or regexes full-matched against module names")
    lora.add_argument("--exclude", nargs="+", default=None, help="regexes of modules to leave out")
    lora.add_argument("--use-rslora", action="store_true", default=None)
    prefix = parser.add_argument_group("prefix (--method prefix)")
    prefix.add_argument("--num-virtual-tokens", type=int, default=_default("num_virtual_tokens"),
                        help="key/value vectors prepended at every attention layer")
    prefix.add_argument("--prefix-projection", action="store_true", default=None,
                        help="train the prefixes through an MLP (the saved adapter holds the final prefixes)")
    prefix.add_argument("--projection-hidden", type=int, default=_default("projection_hidden"),
                        help="hidden size of the --prefix-projection MLP")
    prefix.add_argument("--prefix-init", choices=PREFIX_INITS,
                        help="'activations': the base model's keys/values of the first training tokens (default); "
                             "'random': N(0, 1) as PEFT (the default with --prefix-projection)")
    length = parser.add_argument_group("length (one of)")
    length.add_argument("--steps", type=int, help="optimizer steps")
    length.add_argument("--epochs", type=float, help="passes over the data")
    optim = parser.add_argument_group("optimization")
    optim.add_argument("--batch-size", type=int, default=_default("batch_size"))
    optim.add_argument("--grad-accum", type=int, default=_default("grad_accum"))
    optim.add_argument("--lr", type=float, default=_default("lr"))
    optim.add_argument("--warmup", type=int, default=_default("warmup"), help="warm-up steps")
    optim.add_argument("--schedule", choices=SCHEDULES, default=_default("schedule"))
    optim.add_argument("--weight-decay", type=float, default=_default("weight_decay"))
    optim.add_argument("--max-grad-norm", type=float, default=_default("max_grad_norm"))
    optim.add_argument("--dtype", choices=sorted(TRAIN_DTYPES), default=_default("dtype"))
    optim.add_argument("--seed", type=int, default=_default("seed"))
    optim.add_argument("--gradient-checkpointing", action="store_true", default=None)
    data = parser.add_argument_group("data")
    data.add_argument("--seq-len", type=int, default=_default("seq_len"))
    data.add_argument("--packing", action="store_true", default=None)
    data.add_argument("--val-data", help="validation JSONL")
    data.add_argument("--val-split", type=float, help="fraction of --data held out for validation")
    data.add_argument("--val-every", type=int, default=_default("val_every"), help="steps between validations (0: at the end)")
    data.add_argument("--skip-bad-lines", action="store_true", default=None,
                      help="skip and count malformed lines instead of stopping")
    runs = parser.add_argument_group("checkpoints")
    runs.add_argument("--save-every", type=int, default=_default("save_every"), help="checkpoint every K steps (0: at the end)")
    runs.add_argument("--keep-checkpoints", type=int, default=_default("keep_checkpoints"))
    runs.add_argument("--resume", action="store_true", default=None, help="continue from the newest checkpoint")
    runs.add_argument("--no-progress", action="store_true", help="no progress bar")


def _rank_or_energy(args: argparse.Namespace) -> dict:
    if (args.rank is None) == (args.energy is None):
        raise ValueError("give exactly one of --rank and --energy")
    return {"rank": args.rank, "energy": args.energy}


def cmd_extract(args: argparse.Namespace) -> None:
    """Extract an adapter from a fine-tuned model by truncated SVD of each layer's weight change."""
    from deltaw.svdtools import extract_adapter

    print(extract_adapter(args.base, args.tuned, args.out, uniform=args.uniform, progress=not args.no_progress,
                          **_rank_or_energy(args)))


def cmd_resize(args: argparse.Namespace) -> None:
    """Truncate an adapter's rank by SVD of each layer's B·A."""
    from deltaw.svdtools import logit_difference, resize_adapter

    report = resize_adapter(args.adapter, args.out, uniform=args.uniform, **_rank_or_energy(args))
    print(report)
    if args.model:
        difference, effect = logit_difference(args.model, args.adapter, args.out)
        print(f"logits on a sample sentence: max |resized - original| = {difference:.4g} "
              f"(the original adapter moves them by up to {effect:.4g})")


def cmd_combine(args: argparse.Namespace) -> None:
    """Combine adapters into one: exactly (cat) or truncated (svd)."""
    from deltaw.svdtools import combine_adapters

    weights = args.weights or [1.0] * len(args.adapters)
    print(combine_adapters(args.adapters, weights, args.out, method=args.method, rank=args.rank,
                           energy=args.energy, uniform=args.uniform))


def cmd_plan(args: argparse.Namespace) -> None:
    """Parameters and memory of full fine-tuning vs LoRA vs QLoRA."""
    from deltaw.plan import model_plan, shape_plan

    if args.shape:
        try:
            out_features, in_features = (int(x) for x in args.shape.lower().split("x"))
        except ValueError:
            raise ValueError(f"--shape must look like 8192x8192 (out x in), found {args.shape!r}") from None
        print(shape_plan(out_features, in_features, args.rank, args.dtype))
    else:
        print(model_plan(args.model, args.rank, batch=args.batch, seq_len=args.seq_len, dtype=args.dtype))


def _add_svd_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rank", type=int, help="rank per layer (at most)")
    parser.add_argument("--energy", type=float, help="keep this fraction of each layer's squared Frobenius norm")
    parser.add_argument("--out", required=True, help="output adapter directory")
    parser.add_argument("--uniform", action="store_true",
                        help="zero-pad every layer to the largest rank (for servers that ignore rank_pattern)")


def cmd_serve(args: argparse.Namespace) -> None:
    """Serve the base model and its adapters over an OpenAI-compatible HTTP API."""
    from deltaw.serve.app import serve

    if args.adapters_dir is not None and not os.path.isdir(args.adapters_dir):
        raise FileNotFoundError(f"--adapters-dir {args.adapters_dir}: no such directory")
    for spec in args.adapter:  # fail before loading the model
        if not os.path.isdir(parse_adapter_spec(spec)[1]):
            raise FileNotFoundError(f"--adapter {spec}: no such adapter directory")
    serve(args.model, args.adapter, args.adapters_dir, args.host, args.port, args.api_key, args.max_resident,
          args.max_batch_size, args.max_model_len, DTYPES[args.dtype], args.log_level)


def _add_serve_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=BUNDLED_NAME,
                        help=f"base model (default {BUNDLED_NAME}); clients select it by this name")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                        help="serve an adapter under a name (repeatable); clients select it with model=NAME")
    parser.add_argument("--adapters-dir", help="directory POST /v1/adapters may load adapters from, by name")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("DELTAW_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on every /v1 route (default: $DELTAW_API_KEY)")
    parser.add_argument("--max-resident", type=int, default=32, help="adapters held in memory at once (LRU beyond)")
    parser.add_argument("--max-batch-size", type=int, default=16, help="requests generated together")
    parser.add_argument("--max-model-len", type=int, default=2048, help="prompt + completion tokens per request")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltaw", description="Low-rank adapters on one frozen base model.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    merge = commands.add_parser("merge", help="merge an adapter into the base and save an HF model directory")
    merge.add_argument("--model", default=BUNDLED_NAME, help=f"base model (default {BUNDLED_NAME})")
    merge.add_argument("--adapter", required=True, help="adapter directory (PEFT layout)")
    merge.add_argument("--out", required=True, help="output directory for the merged model")
    merge.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the saved weights")
    merge.add_argument("--ignore-fingerprint", action="store_true",
                       help="load the adapter even if it was made for another base model")
    merge.add_argument("--overwrite", action="store_true", help="write into a non-empty --out directory")
    merge.add_argument("--nf4", action="store_true",
                       help="merge into the NF4 base and re-quantize (lossy: the error is reported); without it a "
                            "QLoRA adapter merges exactly into the dequantized base, written in --dtype")
    merge.add_argument("--val-data", help="with --nf4: JSONL whose loss is reported before and after the merge")
    merge.set_defaults(func=cmd_merge)

    quantize = commands.add_parser("quantize", help="store a model's linear layers as NF4 (QLoRA's base)")
    quantize.add_argument("--model", default=BUNDLED_NAME, help=f"model to quantize (default {BUNDLED_NAME})")
    quantize.add_argument("--out", required=True, help="output directory (loads with --model DIR everywhere)")
    quantize.add_argument("--targets", nargs="+", help="'all-linear' (default) or regexes of modules to quantize")
    quantize.add_argument("--exclude", nargs="+", help="regexes of modules to keep in float")
    quantize.add_argument("--blocksize", type=int, default=64, help="values per absmax (default 64)")
    quantize.add_argument("--no-double-quant", action="store_true", help="keep absmax in fp32 (4.5 bits a weight)")
    quantize.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                          help="compute dtype, and dtype of the weights left in float (default bf16)")
    quantize.add_argument("--overwrite", action="store_true", help="write into a non-empty --out directory")
    quantize.set_defaults(func=cmd_quantize)

    train_parser = commands.add_parser("train", help="train a LoRA, QLoRA or prefix-tuning adapter on JSONL data")
    _add_train_flags(train_parser)
    train_parser.set_defaults(func=cmd_train)

    generate_parser = commands.add_parser("generate", help="generate text with the base model or an adapter")
    _add_generation_flags(generate_parser)
    generate_parser.add_argument("--prompt", required=True)
    generate_parser.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    generate_parser.set_defaults(func=cmd_generate)

    chat_parser = commands.add_parser("chat", help="interactive chat; /use NAME switches adapters")
    _add_generation_flags(chat_parser)
    chat_parser.set_defaults(func=cmd_chat)

    extract = commands.add_parser("extract", help="extract an adapter from a fine-tuned model (SVD of W_tuned - W_base)")
    extract.add_argument("--base", default=BUNDLED_NAME, help=f"base model (default {BUNDLED_NAME})")
    extract.add_argument("--tuned", required=True, help="fine-tuned model directory (safetensors)")
    extract.add_argument("--no-progress", action="store_true")
    _add_svd_flags(extract)
    extract.set_defaults(func=cmd_extract)

    resize = commands.add_parser("resize", help="lower an adapter's rank by SVD")
    resize.add_argument("adapter", help="adapter directory")
    resize.add_argument("--model", help="base model: also report the logit difference on a sample")
    _add_svd_flags(resize)
    resize.set_defaults(func=cmd_resize)

    combine = commands.add_parser("combine", help="combine adapters: exact (cat) or truncated (svd)")
    combine.add_argument("adapters", nargs="+", help="adapter directories")
    combine.add_argument("--weights", type=float, nargs="+", help="one weight per adapter (default 1 each)")
    combine.add_argument("--method", choices=["svd", "cat"], default="svd")
    _add_svd_flags(combine)
    combine.set_defaults(func=cmd_combine)

    plan = commands.add_parser("plan", help="parameters and memory: full fine-tuning vs LoRA vs QLoRA")
    plan.add_argument("--model", default=BUNDLED_NAME, help="model name or directory (its config only is read)")
    plan.add_argument("--shape", help="one linear layer instead, e.g. 8192x8192")
    plan.add_argument("--rank", type=int, default=16)
    plan.add_argument("--batch", type=int, default=0)
    plan.add_argument("--seq-len", type=int, default=0)
    plan.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    plan.set_defaults(func=cmd_plan)

    serve_parser = commands.add_parser("serve", help="serve the base model and many adapters (OpenAI-compatible HTTP)")
    _add_serve_flags(serve_parser)
    serve_parser.set_defaults(func=cmd_serve)

    inspect = commands.add_parser("inspect", help="describe an adapter directory")
    inspect.add_argument("adapter", help="adapter directory")
    inspect.set_defaults(func=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except USER_ERRORS as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"deltaw {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
