"""Test sets for `deltaw eval`: JSONL lines tokenized as training tokenizes them, plus what a greedy answer is
compared with and, for single-token answers, the alternatives it is chosen among.

    {"prompt": "Review: great film. Sentiment:", "completion": " positive", "choices": [" positive", " negative"]}
    {"messages": [{"role": "user", "content": "Capital of Peru?"}, {"role": "assistant", "content": "Lima."}]}
    {"text": "..."}                                        (loss only: no prompt to answer)

The loss is the training loss (deltaw.train.data: the completion and its end token, or every assistant
turn), so `deltaw eval` on a validation file reports what training's validation loss did. The greedy
answer continues the prompt (for a conversation: everything before its last assistant turn) and is
compared with the completion (or that turn). `choices` lists alternative answers; each is represented
by its first token, the completion's first token must be one of them, and the model's pick is the
alternative whose first token it finds most likely there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from deltaw.train.data import DataError, encode, parse_line, render, tokenize_record, truncate


@dataclass
class EvalExample:
    """One scored example.

    Attributes:
        line: its line in the file.
        ids: all its tokens [T] (prompt, answer, end token).
        labels: [T], the training labels: the token where it has loss, IGNORE elsewhere.
        prompt_ids: what the greedy answer continues (None: a "text" line, loss only).
        answer: the expected answer (None: a "text" line).
        choices: the first token of each alternative in `choices`, as ids (None: no choices).
        correct: the index in `choices` of the answer's first token.
    """

    line: int
    ids: list[int]
    labels: list[int]
    prompt_ids: list[int] | None = None
    answer: str | None = None
    choices: list[int] | None = None
    correct: int | None = None


def load_eval_data(path: str | os.PathLike, tokenizer, seq_len: int) -> list[EvalExample]:
    """Read and tokenize a test file; every malformed line is a DataError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file (expected JSONL, one example a line)")
    examples = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                examples.append(_example(parse_line(line), tokenizer, number, seq_len))
            except ValueError as exc:
                raise DataError(f"{path}:{number}: {exc}") from exc
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def _example(record: dict, tokenizer, line: int, seq_len: int) -> EvalExample:
    tokenized = truncate(tokenize_record(record, tokenizer, line), seq_len)
    if not any(label >= 0 for label in tokenized.labels):
        raise ValueError(f"no tokens with loss left after truncation to --seq-len {seq_len}; raise --seq-len")
    example = EvalExample(line, tokenized.input_ids, tokenized.labels)
    if not {"messages", "prompt", "completion"} & record.keys():  # a "text" line
        if "choices" in record:
            raise ValueError("'choices' needs a prompt to answer: use 'prompt' + 'completion' or 'messages'")
        return example
    example.prompt_ids, example.answer = _prompt_and_answer(record, tokenizer)
    if len(example.prompt_ids) >= len(example.ids):
        raise ValueError(f"the prompt fills --seq-len {seq_len}; raise --seq-len")
    if "choices" in record:
        example.choices, example.correct = _choices(record["choices"], example.ids[len(example.prompt_ids)], tokenizer)
    return example


def _prompt_and_answer(record: dict, tokenizer) -> tuple[list[int], str]:
    """(the prompt's tokens, the expected answer): a completion, or a conversation's last assistant turn."""
    if "messages" not in record:
        return encode(tokenizer, record["prompt"]), record["completion"]
    messages = record["messages"]
    last = max(index for index, message in enumerate(messages) if message["role"] == "assistant")
    return encode(tokenizer, render(tokenizer, messages[:last], generation_prompt=True)), messages[last]["content"]


def _choices(choices: object, answer_token: int, tokenizer) -> tuple[list[int], int]:
    """The alternatives' first tokens and the index of the answer's among them."""
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise ValueError(f"'choices' must be a list of at least two non-empty strings, found {choices!r:.80}")
    firsts = [encode(tokenizer, choice)[0] for choice in choices]
    if len(set(firsts)) < len(firsts):
        raise ValueError(f"'choices' {choices!r:.80} do not differ in their first token, so one token cannot tell "
                         "them apart; make them differ at the start (e.g. ' positive' / ' negative')")
    if answer_token not in firsts:
        raise ValueError(f"the answer's first token {tokenizer.decode([answer_token])!r} is the first token of none "
                         f"of 'choices' {choices!r:.80}; the completion must be one of the alternatives")
    return firsts, firsts.index(answer_token)
