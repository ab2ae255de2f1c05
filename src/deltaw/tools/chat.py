"""`deltaw generate` and `deltaw chat`: a base model with named adapters, answers streamed to the terminal."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import TextStreamer

from deltaw.adapters import deactivate_adapters, list_adapters, set_adapter
from deltaw.models.chat import chat_inputs
from deltaw.models.loading import DTYPES
from deltaw.tools.generation import GenerationOptions, generate, load_with_adapters

CHAT_HELP = "commands: /use NAME (switch adapter), /base (no adapter), /adapters (list), /reset (forget history), /quit"


@dataclass(kw_only=True)
class GenerateOptions(GenerationOptions):
    """`deltaw generate`: one completion.

    Attributes:
        prompt: the prompt.
        chat: wrap the prompt in the chat template as a user message.
    """

    prompt: str
    chat: bool = False


def _start(model: nn.Module, name: str | None) -> str | None:
    """Activate the adapter the user chose with --use (the only one loaded, if there is one)."""
    names = list_adapters(model)
    if name is None and len(names) > 1:
        raise ValueError(f"several adapters are loaded ({names}); choose one with --use NAME")
    name = name or (names[0] if names else None)
    if name is not None:
        set_adapter(model, name)
    return name


def run_generate(options: GenerateOptions) -> str:
    """Generate one completion (a chat answer with `chat`), streamed to the terminal; returns its text."""
    model, tokenizer = load_with_adapters(options.model, options.adapter, DTYPES[options.dtype])
    _start(model, options.use)
    if options.chat:
        inputs = chat_inputs(tokenizer, [{"role": "user", "content": options.prompt}])
    else:
        inputs = tokenizer(options.prompt, return_tensors="pt")
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    return generate(model, tokenizer, inputs, options.max_new_tokens, options.temperature, options.top_p,
                    options.seed, streamer)[0]


def run_chat(options: GenerationOptions) -> None:
    """An interactive chat (standard input) whose adapter can be switched mid-conversation."""
    model, tokenizer = load_with_adapters(options.model, options.adapter, DTYPES[options.dtype])
    current = _start(model, options.use)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    history: list[dict] = []
    print(f"chatting with {current or 'the base model'}; {CHAT_HELP}")
    while True:
        try:
            line = input(f"[{current or 'base'}] you> ").strip()
        except EOFError:
            print()
            return
        command, _, argument = line.partition(" ")
        if not line:
            continue
        if command in ("/quit", "/exit"):
            return
        if command.startswith("/"):
            current = _chat_command(model, history, command, argument.strip(), current)
            continue
        history.append({"role": "user", "content": line})
        print(f"{current or 'base'}> ", end="", flush=True)
        reply = generate(model, tokenizer, chat_inputs(tokenizer, history), options.max_new_tokens,
                         options.temperature, options.top_p, options.seed, streamer)[0]
        history.append({"role": "assistant", "content": reply.strip()})


def _chat_command(model: nn.Module, history: list[dict], command: str, argument: str, current: str | None
                  ) -> str | None:
    """Run one /command of the chat; returns the adapter in use after it."""
    if command == "/adapters":
        names = list_adapters(model)
        print("adapters: " + ", ".join(f"{n}{' (active)' if n == current else ''}" for n in names)
              if names else "no adapters loaded")
    elif command == "/base":
        deactivate_adapters(model)
        print("now: the base model")
        return None
    elif command == "/use":
        try:
            set_adapter(model, argument)
        except KeyError as exc:
            print(f"error: {exc.args[0]}")
            return current
        print(f"now: {argument}")
        return argument
    elif command == "/reset":
        history.clear()
        print("history cleared")
    else:
        print(f"unknown command {command!r}; {CHAT_HELP}")
    return current
