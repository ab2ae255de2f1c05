"""JSONL training data -> token ids and loss masks.

One JSON object a line, in one of three shapes:

    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
        rendered with the tokenizer's chat template; loss on the assistant turns (with their end token)
    {"prompt": "...", "completion": "..."}     loss on the completion and the end-of-sequence token
    {"text": "..."}                            loss on every token, end-of-sequence token included

Every malformed line is an error naming the file and line. With `skip_bad_lines=True` such lines
are skipped, counted and reported instead (`Dataset.skipped`), never dropped silently.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROLES = ("system", "user", "assistant")
IGNORE = -100  # label of a position without loss (torch's cross_entropy ignore_index)


class DataError(ValueError):
    """A training file that cannot be used as it is; the message names the file and line."""


@dataclass
class Example:
    """One tokenized example. input_ids: [T]; labels: [T], IGNORE where there is no loss."""

    input_ids: list[int]
    labels: list[int]
    line: int

    @property
    def loss_tokens(self) -> int:
        return sum(label != IGNORE for label in self.labels)


@dataclass
class Dataset:
    """Tokenized examples of one file, with what was skipped and why."""

    path: Path
    examples: list[Example]
    skipped: list[str] = field(default_factory=list)
    sha256: str = ""

    def summary(self) -> str:
        tokens = sum(len(e.input_ids) for e in self.examples)
        loss = sum(e.loss_tokens for e in self.examples)
        text = f"{self.path}: {len(self.examples)} examples, {tokens:,} tokens ({loss:,} with loss)"
        if self.skipped:
            text += f"; skipped {len(self.skipped)} bad lines (first: {self.skipped[0]})"
        return text


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_jsonl(path: str | os.PathLike, tokenizer, seq_len: int, skip_bad_lines: bool = False) -> Dataset:
    """Read and tokenize a JSONL file; truncate each example to `seq_len` tokens."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file (expected JSONL, one example a line)")
    examples, skipped = [], []
    with open(path, encoding="utf-8", errors="surrogateescape") as handle:  # bad bytes: that line's error
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                example = tokenize_record(parse_line(line), tokenizer, number)
                example = truncate(example, seq_len)
                if example.loss_tokens == 0:
                    raise ValueError(f"no tokens with loss left after truncation to --seq-len {seq_len}; "
                                     "raise --seq-len or shorten the example")
                examples.append(example)
            except ValueError as exc:
                message = f"{path}:{number}: {exc}"
                if not skip_bad_lines:
                    raise DataError(message + " (or pass --skip-bad-lines to skip and count such lines)") from exc
                skipped.append(message)
    if not examples:
        raise DataError(f"{path}: no usable examples" + (f" ({len(skipped)} bad lines)" if skipped else ""))
    return Dataset(path=path, examples=examples, skipped=skipped, sha256=file_sha256(path))


def parse_line(line: str) -> dict:
    """One JSON object of a known shape; ValueError with the reason otherwise (bytes that are not UTF-8
    arrive as surrogate escapes, U+DC80..U+DCFF)."""
    undecodable = next((column for column, char in enumerate(line, start=1) if "\udc80" <= char <= "\udcff"), None)
    if undecodable is not None:
        byte = ord(line[undecodable - 1]) - 0xDC00
        raise ValueError(f"not UTF-8 text (byte 0x{byte:02x} at column {undecodable}); save the file as UTF-8")
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"bad JSON ({exc.msg} at column {exc.colno})") from exc
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, found {type(record).__name__}")
    if "messages" in record:
        check_messages(record["messages"])
    elif "prompt" in record or "completion" in record:
        for key in ("prompt", "completion"):
            check_text(record.get(key), key)
    elif "text" in record:
        check_text(record["text"], "text")
    else:
        raise ValueError(f"unknown shape with keys {sorted(record)}: expected 'messages', "
                         "'prompt' + 'completion', or 'text'")
    return record


def check_text(value: object, key: str) -> None:
    if not isinstance(value, str):
        raise ValueError(f"'{key}' must be a string, found {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"'{key}' is empty")


def check_messages(messages: object) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list of {'role', 'content'} objects")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ValueError(f"messages[{index}]: role must be one of {ROLES}, found {message!r:.80}")
        check_text(message.get("content"), f"messages[{index}].content")
    if not any(message["role"] == "assistant" for message in messages):
        raise ValueError("a conversation with no assistant turn has nothing to learn")


def tokenize_record(record: dict, tokenizer, line: int) -> Example:
    """Token ids and labels for one parsed record (see the module docstring for what gets loss)."""
    if "messages" in record:
        return tokenize_chat(record["messages"], tokenizer, line)
    eos = [tokenizer.eos_token_id]
    if "text" in record:
        ids = encode(tokenizer, record["text"]) + eos
        return Example(ids, list(ids), line)
    prompt = encode(tokenizer, record["prompt"])
    completion = encode(tokenizer, record["completion"]) + eos
    return Example(prompt + completion, [IGNORE] * len(prompt) + completion, line)


def tokenize_chat(messages: list[dict], tokenizer, line: int) -> Example:
    """Render with the chat template; each assistant turn's tokens (and its end token) get loss.

    A turn's span is found by rendering the conversation up to the turn (with the generation prompt)
    and up to its end; the template must render prefixes consistently, which is checked.
    """
    ids = encode(tokenizer, render(tokenizer, messages))
    labels = [IGNORE] * len(ids)
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(encode(tokenizer, render(tokenizer, messages[:index], generation_prompt=True)))
        upto = encode(tokenizer, render(tokenizer, messages[: index + 1]))
        if ids[: len(upto)] != upto:
            raise ValueError("the chat template does not render this conversation's prefixes consistently, "
                             "so assistant turns cannot be located")
        labels[start : len(upto)] = ids[start : len(upto)]
    return Example(ids, labels, line)


def render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def truncate(example: Example, seq_len: int) -> Example:
    return Example(example.input_ids[:seq_len], example.labels[:seq_len], example.line)


def pack(examples: list[Example], seq_len: int) -> list[Example]:
    """Concatenate examples (in order) into sequences of at most `seq_len` tokens.

    Examples are not split; attention spans the examples packed together (as in TRL's packing),
    which trades a little cross-example leakage for no padding.
    """
    packed: list[Example] = []
    ids: list[int] = []
    labels: list[int] = []
    first_line = 0
    for example in examples:
        if ids and len(ids) + len(example.input_ids) > seq_len:
            packed.append(Example(ids, labels, first_line))
            ids, labels = [], []
        if not ids:
            first_line = example.line
        ids = ids + example.input_ids
        labels = labels + example.labels
    if ids:
        packed.append(Example(ids, labels, first_line))
    return packed


def split_validation(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, validation): a seeded random `fraction` of the examples held out (at least one)."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"--val-split must be between 0 and 1, found {fraction}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    count = max(1, round(fraction * len(examples)))
    if count >= len(examples):
        raise DataError(f"--val-split {fraction} leaves no training examples out of {len(examples)}")
    held = set(order[:count])
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids, labels (IGNORE at pads), attention_mask, all [B, T]."""
    length = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        size = len(example.input_ids)
        input_ids[row, :size] = torch.tensor(example.input_ids)
        labels[row, :size] = torch.tensor(example.labels)
        attention_mask[row, :size] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
