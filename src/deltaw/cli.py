"""The `deltaw` command: one sub-command per task, each a thin layer over the Python API."""

from __future__ import annotations

import argparse
import sys
import time

import torch

from deltaw.adapter import AdapterFormatError, describe_adapter, load_adapter
from deltaw.export import export_merged
from deltaw.models import BUNDLED_NAME, ModelLoadError, load_model
from deltaw.targets import TargetError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
USER_ERRORS = (AdapterFormatError, TargetError, ModelLoadError, FileExistsError, FileNotFoundError, KeyError, ValueError)


def cmd_merge(args: argparse.Namespace) -> None:
    """Merge an adapter into its base model and write an HF model directory."""
    start = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=torch.float32)
    load_adapter(model, args.adapter, "merged", ignore_fingerprint=args.ignore_fingerprint)
    out = export_merged(model, tokenizer, "merged", args.out, dtype=DTYPES[args.dtype], overwrite=args.overwrite)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"merged {args.adapter} into {args.model} -> {out} ({args.dtype}, {size / 2**20:.1f} MiB, "
          f"{time.perf_counter() - start:.1f} s)")
    print(f"load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")


def cmd_inspect(args: argparse.Namespace) -> None:
    """Print an adapter's config, targets, ranks, size and base fingerprint."""
    print(describe_adapter(args.adapter))


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
    merge.set_defaults(func=cmd_merge)

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
