"""Per-request sampling and incremental detokenization for the serving engine.

`SamplingParams` says how to pick tokens; `sample_token` picks one from a row's logits with the
request's own generator (so a seed gives the same text alone or in any batch); `TextStream` turns
the growing list of generated ids into text pieces safe to send: it never splits a multi-byte
character and holds back any tail that could still become a stop string.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from deltaw.serve.logprobs import MAX_LOGPROBS


@dataclass
class SamplingParams:
    """How one request generates.

    Attributes:
        max_tokens: most new tokens to generate (>= 1).
        temperature: 0 picks the most likely token (greedy); > 0 samples from softmax(logits / temperature).
        top_p: sample only from the smallest set of tokens whose probability reaches top_p, in (0, 1].
        stop: strings that end generation when they appear; they are not included in the output.
        seed: seeds this request's own generator: the same seed gives the same text whatever the batch.
        logprobs: report each generated token's log-probability and this many most likely alternatives
            (0 to 20); None: no logprobs.
        prompt_logprobs: the same for the prompt's tokens (OpenAI's `echo` with `logprobs`); None: none.
    """

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def check(self) -> None:
        """Raise ValueError naming the first bad field and its allowed range."""
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, found {self.max_tokens!r}")
        if not _is_number(self.temperature) or not 0 <= self.temperature <= 100:
            raise ValueError(f"temperature must be a number in [0, 100] (0: greedy), found {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1], found {self.top_p!r}")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, found {self.stop!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"seed must be a non-negative integer or None, found {self.seed!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 0 <= value <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be an integer in [0, {MAX_LOGPROBS}] or None, found {value!r}")

    def generator(self) -> torch.Generator | None:
        """A fresh generator seeded with `seed` (None: sampling draws from torch's global generator)."""
        return None if self.seed is None else torch.Generator().manual_seed(self.seed)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from `logits` [vocab] (any float dtype; computed in float32)."""
    logits = logits.float()
    if params.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # probability mass ranked above each token
        sorted_probs[before >= params.top_p] = 0.0  # keep the token that crosses top_p, drop the rest
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


class TextStream:
    """The text of a growing token sequence, released in pieces that are final.

    Each `push(token)` re-decodes all generated ids (so characters spanning tokens decode right) and
    returns the newly final suffix. Text is held back while it ends in an incomplete character
    (U+FFFD) or in a prefix of a stop string. `stopped` turns true when a stop string appears; the
    text is then cut before it.
    """

    def __init__(self, tokenizer, stop: list[str]) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.text = ""  # the text released so far
        self.stopped = False

    def push(self, token: int) -> str:
        """Add `token`; return the newly released text (may be "")."""
        self.ids.append(token)
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((index for index in (full.find(s) for s in self.stop) if index >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._release(full[:cut])
        safe = len(full) - self._held_back(full)
        return self._release(full[:safe])

    def flush(self) -> str:
        """The held-back tail (generation ended without a stop string)."""
        if self.stopped or not self.ids:
            return ""
        return self._release(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def _held_back(self, full: str) -> int:
        """How many trailing characters might still change: an incomplete character or a stop prefix."""
        if full.endswith("\ufffd"):
            return len(full) - len(full.rstrip("\ufffd"))
        longest = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(full)), longest, -1):
                if full.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    def _release(self, upto: str) -> str:
        if not upto.startswith(self.text) or len(upto) <= len(self.text):
            return ""
        piece = upto[len(self.text):]
        self.text = upto
        return piece
