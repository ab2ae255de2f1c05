"""What every HTTP route needs: the engine, its bank and tokenizer, the served names, the key and the metrics."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from deltaw.serve.bank import AdapterBank
from deltaw.serve.engine import Engine
from deltaw.serve.llamacpp import LoraTable
from deltaw.serve.metrics import ServerMetrics

EVENT_WAITERS = 256  # threads that tokenize, submit, or wait for a result (made on demand; idle ones cost nothing)
NORMALIZER_SLACK = 4  # normalizers may merge characters (NFC: 3 jamo -> 1 Hangul syllable); room for it


@dataclass
class ServerState:
    """What every route needs: the engine, its bank and tokenizer, the names, the key and the metrics.

    Attributes:
        token_bytes: the most bytes of text one token stands for; a prompt of more than max_model_len x
            token_bytes x NORMALIZER_SLACK bytes cannot fit, and is refused before it is tokenized.
    """

    engine: Engine
    bank: AdapterBank
    tokenizer: PreTrainedTokenizerBase
    base_name: str
    api_key: str | None = None
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    waiters: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(EVENT_WAITERS, "deltaw-wait"))
    started: int = field(default_factory=lambda: int(time.time()))
    lora_table: LoraTable = field(default_factory=LoraTable)  # llama.cpp's adapter ids and server-wide scales
    token_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.token_bytes = most_bytes_per_token(self.tokenizer)

    def served_names(self) -> list[str]:
        return [self.base_name, *self.bank.names()]

    def max_prompt_bytes(self) -> int:
        """The most UTF-8 bytes of prompt text that could fit in max_model_len tokens (see token_bytes)."""
        return self.engine.max_model_len * self.token_bytes * NORMALIZER_SLACK


def most_bytes_per_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """The most bytes of text one vocabulary entry stands for, bounded by the UTF-8 length of its stored
    form (byte-level BPE, SentencePiece and added tokens alike)."""
    return max(len(token.encode("utf-8", "surrogatepass")) for token in tokenizer.get_vocab())
