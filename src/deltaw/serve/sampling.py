"""Per-request sampling and incremental detokenization for the serving engine.

`SamplingParams` says how to pick tokens; `sample_token` picks one from a row's logits with the
request's own generator (so a seed gives the same text alone or in any batch); `TextStream` turns
the growing list of generated ids into text pieces safe to send: it never splits a multi-byte
character and holds back any tail that could still become a stop string.

Degenerate values never make sampling throw: a temperature below MIN_TEMPERATURE is greedy (dividing
the logits by it could only overflow them to infinity), and the most likely token always survives
top_p, however small. Stop strings are bounded (MAX_STOP_STRINGS of at most MAX_STOP_CHARS
characters), since the engine thread checks every one of them after every token of its request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from deltaw.serve.logprobs import MAX_LOGPROBS

MIN_TEMPERATURE = 1e-5  # a lower temperature samples greedily (vLLM's threshold too)
MAX_STOP_STRINGS = 32  # stop strings per request (OpenAI allows 4)
MAX_STOP_CHARS = 256  # characters per stop string
SEED_LIMIT = 2**64  # torch generators take seeds in [0, 2**64)


class SamplingError(ValueError):
    """A sampling parameter out of its range; `field` names it (the HTTP error's `param`)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass
class SamplingParams:
    """How one request generates.

    Attributes:
        max_tokens: most new tokens to generate (>= 1).
        temperature: 0 picks the most likely token (greedy, as does any value below MIN_TEMPERATURE);
            > 0 samples from softmax(logits / temperature).
        top_p: sample only from the smallest set of tokens whose probability reaches top_p, in (0, 1]
            (the most likely token is always kept).
        stop: strings that end generation when they appear; they are not included in the output
            (at most MAX_STOP_STRINGS, each of at most MAX_STOP_CHARS characters).
        seed: seeds this request's own generator, in [0, 2**64): the same seed gives the same text
            whatever the batch.
        logprobs: report each generated token's log-probability and this many most likely alternatives
            (0 to 20); None: no logprobs.
        prompt_logprobs: the same for the prompt's tokens (OpenAI's `echo` with `logprobs`); None: none.
        ignore_eos: keep generating past the end-of-sequence token, up to max_tokens (vLLM's and llama.cpp's
            `ignore_eos`: benchmarks ask for exact lengths this way).
    """

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    ignore_eos: bool = False

    def check(self) -> None:
        """Raise SamplingError naming the first bad field and its allowed range."""
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise SamplingError("max_tokens", f"max_tokens must be an integer >= 1, found {self.max_tokens!r}")
        if not _is_number(self.temperature) or not 0 <= self.temperature <= 100:
            raise SamplingError("temperature", "temperature must be a number in [0, 100] (0: greedy), "
                                f"found {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise SamplingError("top_p", f"top_p must be a number in (0, 1], found {self.top_p!r}")
        self._check_stop()
        if not isinstance(self.ignore_eos, bool):
            raise SamplingError("ignore_eos", f"ignore_eos must be true or false, found {self.ignore_eos!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < SEED_LIMIT):
            raise SamplingError("seed", f"seed must be an integer in [0, 2**64) or None, found {self.seed!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 0 <= value <= MAX_LOGPROBS):
                raise SamplingError(name, f"{name} must be an integer in [0, {MAX_LOGPROBS}] or None, "
                                    f"found {value!r}")

    def _check_stop(self) -> None:
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise SamplingError("stop", f"stop must be a list of non-empty strings, found {self.stop!r:.200}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise SamplingError("stop", f"stop: at most {MAX_STOP_STRINGS} stop strings, found {len(self.stop)}")
        longest = max(self.stop, key=len, default="")
        if len(longest) > MAX_STOP_CHARS:
            raise SamplingError("stop", f"stop: each stop string may have at most {MAX_STOP_CHARS} characters, "
                                f"found one of {len(longest)}")

    @property
    def greedy(self) -> bool:
        """Whether this request takes the most likely token (temperature below MIN_TEMPERATURE)."""
        return self.temperature < MIN_TEMPERATURE

    def generator(self) -> torch.Generator | None:
        """A fresh generator seeded with `seed` (None: sampling draws from torch's global generator)."""
        return None if self.seed is None else torch.Generator().manual_seed(self.seed)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from `logits` [vocab] (any float dtype; computed in float32).

    Greedy below MIN_TEMPERATURE; with top_p < 1, the tokens ranked after the one whose cumulative
    probability reaches top_p are dropped, the most likely token never (so a top_p below the smallest
    float keeps exactly it).
    """
    logits = logits.float()
    if params.greedy:
        return int(logits.argmax())
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # probability mass ranked above each token
        drop = before >= params.top_p  # keep the token that crosses top_p, drop the rest
        drop[0] = False
        sorted_probs[drop] = 0.0
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
            longest = max(longest, _stop_prefix_at_end(full, stop, longer_than=longest))
        return longest

    def _release(self, upto: str) -> str:
        if not upto.startswith(self.text) or len(upto) <= len(self.text):
            return ""
        piece = upto[len(self.text):]
        self.text = upto
        return piece


def _stop_prefix_at_end(full: str, stop: str, longer_than: int = 0) -> int:
    """The length of the longest suffix of `full` that is a proper prefix of `stop`, if longer than
    `longer_than` (else 0). Only positions holding stop's first character are tried, so the cost is
    a few C-level searches, not one comparison per possible length."""
    index = full.find(stop[0], max(len(full) - len(stop) + 1, 0), len(full) - longer_than)
    while index != -1:
        if stop.startswith(full[index:]):
            return len(full) - index
        index = full.find(stop[0], index + 1, len(full) - longer_than)
    return 0
