"""The `deltaw` command: one sub-command per task, each a settings dataclass and the library call it feeds.

Flags, their defaults and their help come from the dataclasses (deltaw.flags), so a default is written
once, next to the code that uses it. A user-caused error prints one line and exits with status 2: bad
settings, unusable inputs, and any file-system error (an --out under a file, on a read-only file
system, ...). A command that writes --out checks it can before it starts working.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltaw.adapters import AdapterFormatError, describe_adapter
from deltaw.adapters.targets import TargetError
from deltaw.flags import Parser, add_flags, build
from deltaw.models.loading import ModelLoadError
from deltaw.serve.app import serve
from deltaw.serve.config import ServeConfig
from deltaw.tools.chat import GenerateOptions, run_chat, run_generate
from deltaw.tools.eval import EvalOptions, run_eval
from deltaw.tools.eval_backends import EvalServerError
from deltaw.tools.export import ExportOptions, export_adapter
from deltaw.tools.generation import GenerationOptions
from deltaw.tools.merge import MergeOptions, merge_to_dir
from deltaw.tools.plan import PlanOptions, plan
from deltaw.tools.quantize import QuantizeOptions, quantize_to_dir
from deltaw.tools.svdtools import CombineOptions, ExtractOptions, ResizeOptions, run_combine, run_extract, run_resize
from deltaw.train import TrainConfig, TrainingError, train
from deltaw.train.checkpoint import CheckpointError
from deltaw.train.data import DataError

USER_ERRORS = (AdapterFormatError, TargetError, ModelLoadError, DataError, TrainingError, CheckpointError,
               EvalServerError, OSError, KeyError, ValueError)


@dataclass
class InspectOptions:
    """`deltaw inspect`.

    Attributes:
        adapter: the adapter directory (or a llama.cpp LoRA .gguf file).
    """

    adapter: str = field(metadata={"positional": True})


def run_train(config: TrainConfig) -> None:
    result = train(config)
    if result.rank:  # under torchrun rank 0 reports for all
        return
    val = f", validation loss {result.final_val_loss:.4f}" if result.final_val_loss is not None else ""
    print(f"trained {result.steps} steps on {result.tokens:,} tokens in {result.seconds:.0f} s: loss "
          f"{result.final_loss:.4f}{val}\nadapter -> {result.out} (metrics.jsonl, loss.png, checkpoints/)")


# name -> (help, settings class, what runs them; a returned value is printed)
COMMANDS: dict[str, tuple[str, type, Callable[[Any], Any]]] = {
    "train": ("train a LoRA, QLoRA or prefix-tuning adapter on JSONL data", TrainConfig, run_train),
    "generate": ("generate text with the base model or an adapter", GenerateOptions, run_generate),
    "chat": ("interactive chat; /use NAME switches adapters", GenerationOptions, run_chat),
    "serve": ("serve the base model and many adapters (OpenAI-compatible HTTP)", ServeConfig, serve),
    "eval": ("score a JSONL test set with the base model and each adapter (here or on a server)", EvalOptions,
             run_eval),
    "merge": ("merge an adapter into the base and save an HF model directory", MergeOptions, merge_to_dir),
    "quantize": ("store a model's linear layers as NF4 (QLoRA's base)", QuantizeOptions, quantize_to_dir),
    "export": ("write an adapter as a llama.cpp LoRA GGUF (llama-server --lora, Ollama)", ExportOptions,
               export_adapter),
    "inspect": ("describe an adapter directory or .gguf file", InspectOptions,
                lambda options: describe_adapter(options.adapter)),
    "extract": ("extract an adapter from a fine-tuned model (SVD of W_tuned - W_base)", ExtractOptions, run_extract),
    "resize": ("lower an adapter's rank by SVD", ResizeOptions, run_resize),
    "combine": ("combine adapters: exact (cat) or truncated (svd)", CombineOptions, run_combine),
    "plan": ("parameters and memory: full fine-tuning vs LoRA vs QLoRA", PlanOptions, plan),
}
QUIET = {"eval", "generate", "merge", "quantize", "serve"}  # they print as they go; their result is not printed again


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="deltaw", description="Low-rank adapters on one frozen base model.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, settings, _) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        add_flags(sub, settings)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _, settings, run = COMMANDS[args.command]
    try:
        options = build(settings, args)
        if isinstance(getattr(options, "out", None), str):
            check_output_dir(options.out, is_file=getattr(options, "OUT_IS_FILE", False))
        result = run(options)
        if result is not None and args.command not in QUIET:
            print(result)
    except USER_ERRORS as exc:
        print(f"deltaw {args.command}: error: {error_line(exc)}", file=sys.stderr)
        return 2
    return 0


def check_output_dir(out: str, is_file: bool = False) -> None:
    """Raise ValueError unless `out` is, or can become, a directory this process may write into (or, with
    `is_file`, a file in such a directory; whether an existing file may be replaced is the command's
    business): the nearest existing ancestor must be a directory, writable (not on a read-only file system,
    not immutable, not forbidden)."""
    existing = Path(out).expanduser().absolute()
    if is_file:
        existing = existing.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"--out {out}: {existing} is a file, not a directory; choose another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: cannot write in {existing} (read-only, immutable or not permitted); "
                         "choose another --out")


def error_line(exc: BaseException) -> str:
    """One line saying what went wrong: a KeyError's message without its quotes, an OSError's file and reason."""
    if isinstance(exc, KeyError) and exc.args:
        return str(exc.args[0])
    if isinstance(exc, OSError) and exc.filename and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    return " ".join(str(exc).split())


if __name__ == "__main__":
    sys.exit(main())
