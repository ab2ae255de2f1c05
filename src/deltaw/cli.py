"""The `deltaw` command: one sub-command per task, each a settings dataclass and the library call it feeds.

Flags, their defaults and their help come from the dataclasses (deltaw.flags), so a default is written
once, next to the code that uses it. A user-caused error prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from deltaw.adapters import AdapterFormatError, describe_adapter
from deltaw.adapters.targets import TargetError
from deltaw.flags import add_flags, build
from deltaw.models.loading import ModelLoadError
from deltaw.serve.app import serve
from deltaw.serve.config import ServeConfig
from deltaw.tools.chat import GenerateOptions, run_chat, run_generate
from deltaw.tools.generation import GenerationOptions
from deltaw.tools.merge import MergeOptions, merge_to_dir
from deltaw.tools.plan import PlanOptions, plan
from deltaw.tools.quantize import QuantizeOptions, quantize_to_dir
from deltaw.tools.svdtools import CombineOptions, ExtractOptions, ResizeOptions, run_combine, run_extract, run_resize
from deltaw.train import TrainConfig, TrainingError, train
from deltaw.train.checkpoint import CheckpointError
from deltaw.train.data import DataError

USER_ERRORS = (AdapterFormatError, TargetError, ModelLoadError, DataError, TrainingError, CheckpointError,
               FileExistsError, FileNotFoundError, KeyError, ValueError)


@dataclass
class InspectOptions:
    """`deltaw inspect`.

    Attributes:
        adapter: the adapter directory.
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
    "merge": ("merge an adapter into the base and save an HF model directory", MergeOptions, merge_to_dir),
    "quantize": ("store a model's linear layers as NF4 (QLoRA's base)", QuantizeOptions, quantize_to_dir),
    "inspect": ("describe an adapter directory", InspectOptions, lambda options: describe_adapter(options.adapter)),
    "extract": ("extract an adapter from a fine-tuned model (SVD of W_tuned - W_base)", ExtractOptions, run_extract),
    "resize": ("lower an adapter's rank by SVD", ResizeOptions, run_resize),
    "combine": ("combine adapters: exact (cat) or truncated (svd)", CombineOptions, run_combine),
    "plan": ("parameters and memory: full fine-tuning vs LoRA vs QLoRA", PlanOptions, plan),
}
QUIET = {"generate", "merge", "quantize", "serve"}  # commands that print as they go; their result is not printed again


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltaw", description="Low-rank adapters on one frozen base model.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, settings, _) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        add_flags(sub, settings)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _, settings, run = COMMANDS[args.command]
    try:
        result = run(build(settings, args))
        if result is not None and args.command not in QUIET:
            print(result)
    except USER_ERRORS as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"deltaw {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
