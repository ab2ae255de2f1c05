"""Token log-probabilities: computed from each row's own logits, and written in OpenAI's two shapes.

    engine:  logits [rows, vocab] -> log_softmax per row (float32) -> the chosen token's logprob + the top k
    chat:         {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}
    completions:  {"tokens": [...], "token_logprobs": [...], "top_logprobs": [{token: logprob}], "text_offset": [...]}

The distribution is the model's own (before temperature and top-p), as vLLM reports by default, so a
logprob means the same whatever the request's sampling settings. Each row uses its own logits, so a
request's logprobs do not depend on what else is in the batch. With `echo`, the prompt's tokens get
logprobs too (the first has none: nothing predicts it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_LOGPROBS = 20  # most alternatives per token (OpenAI's top_logprobs limit)


@dataclass
class TokenLogprob:
    """One token's log-probability and the most likely tokens at its position.

    Attributes:
        token_id: the token (generated, or the prompt's).
        logprob: log p(token | everything before it).
        top: the `k` most likely tokens there, most likely first: [(token_id, logprob), ...].
    """

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


def token_logprobs(logits: torch.Tensor, tokens: list[int], ks: list[int | None]) -> list[TokenLogprob | None]:
    """Row i's TokenLogprob for `tokens[i]` with its top `ks[i]` alternatives (None where ks[i] is None).

    Args:
        logits: [rows, vocab], any float dtype (computed in float32).
        tokens: the token chosen in each row.
        ks: per row, how many alternatives to report, or None for no logprobs.
    """
    wanted = [row for row, k in enumerate(ks) if k is not None]
    entries: list[TokenLogprob | None] = [None] * len(ks)
    if not wanted:
        return entries
    rows = torch.tensor(wanted)
    chosen = torch.tensor([tokens[row] for row in wanted])
    return _fill(entries, wanted, torch.log_softmax(logits[rows].float(), dim=-1), chosen, [ks[row] for row in wanted])


def prompt_logprobs(logits: torch.Tensor, prompt_ids: list[int], k: int) -> list[TokenLogprob | None]:
    """The prompt's tokens with their logprobs: None for the first, then each token given the ones before it.

    Args:
        logits: [len(prompt_ids), vocab], the logits at the prompt's positions (position i predicts token i+1).
        prompt_ids: the prompt's token ids.
        k: alternatives per token.
    """
    entries: list[TokenLogprob | None] = [None] * len(prompt_ids)
    if len(prompt_ids) < 2:
        return entries
    positions = list(range(1, len(prompt_ids)))
    logprobs = torch.log_softmax(logits[:-1].float(), dim=-1)
    return _fill(entries, positions, logprobs, torch.tensor(prompt_ids[1:]), [k] * len(positions))


def _fill(entries: list, slots: list[int], logprobs: torch.Tensor, chosen: torch.Tensor, ks: list[int]) -> list:
    """entries[slots[j]] = chosen[j]'s logprob in logprobs[j] with the top ks[j]; logprobs: [len(slots), vocab]."""
    picked = logprobs.gather(1, chosen[:, None])[:, 0].tolist()
    top_values, top_ids = logprobs.topk(max(ks), dim=-1) if max(ks) > 0 else (None, None)
    for j, slot in enumerate(slots):
        top = [] if top_ids is None else list(zip(top_ids[j, : ks[j]].tolist(), top_values[j, : ks[j]].tolist()))
        entries[slot] = TokenLogprob(int(chosen[j]), picked[j], top)
    return entries


# --------------------------------------------------------------------------------------------- wire shapes
def token_text(tokenizer, token_id: int) -> str:
    """A token on its own, as text (special tokens included; a partial UTF-8 character shows as U+FFFD)."""
    return tokenizer.decode([token_id], skip_special_tokens=False)


def chat_logprobs(entries: list[TokenLogprob], tokenizer) -> dict:
    """OpenAI's chat `logprobs`: {"content": [...], "refusal": None}."""

    def item(token_id: int, logprob: float) -> dict:
        text = token_text(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = [{**item(entry.token_id, entry.logprob), "top_logprobs": [item(t, lp) for t, lp in entry.top]}
               for entry in entries]
    return {"content": content, "refusal": None}


def completion_logprobs(entries: list[TokenLogprob | None], tokens: list[int], tokenizer, offset: int = 0) -> dict:
    """OpenAI's completions `logprobs` for `tokens` (entries[i] None: a first prompt token, which has none).

    `top_logprobs` maps each of the top tokens (and the chosen one) to its logprob; `text_offset` counts
    characters from `offset` (the text already sent before these tokens).
    """
    texts = [token_text(tokenizer, token) for token in tokens]
    offsets = []
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    top_logprobs = []
    for entry, text in zip(entries, texts):
        if entry is None:
            top_logprobs.append(None)
            continue
        top = {token_text(tokenizer, token): logprob for token, logprob in entry.top}
        top.setdefault(text, entry.logprob)
        top_logprobs.append(top)
    return {"tokens": texts, "token_logprobs": [None if entry is None else entry.logprob for entry in entries],
            "top_logprobs": top_logprobs, "text_offset": offsets}


class LogprobsFormat:
    """One request's logprobs in its endpoint's shape. For completions, `text_offset` runs on from call to call
    (stream chunks, or the echoed prompt and then the completion)."""

    def __init__(self, tokenizer, chat: bool) -> None:
        self.tokenizer, self.chat, self.offset = tokenizer, chat, 0

    def __call__(self, entries: list[TokenLogprob | None], tokens: list[int] | None = None) -> dict:
        """`entries` (None: a first prompt token) for `tokens` (default: the entries' own tokens)."""
        if self.chat:
            return chat_logprobs(entries, self.tokenizer)
        tokens = [entry.token_id for entry in entries] if tokens is None else tokens
        body = completion_logprobs(entries, tokens, self.tokenizer, self.offset)
        self.offset += sum(len(text) for text in body["tokens"])
        return body
