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

EVENT_WAITERS = 256  # worker threads that wait on engine events (created on demand; idle ones cost nothing)


@dataclass
class ServerState:
    """What every route needs: the engine, its bank and tokenizer, the names, the key and the metrics."""

    engine: Engine
    bank: AdapterBank
    tokenizer: PreTrainedTokenizerBase
    base_name: str
    api_key: str | None = None
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    waiters: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(EVENT_WAITERS, "deltaw-wait"))
    started: int = field(default_factory=lambda: int(time.time()))
    lora_table: LoraTable = field(default_factory=LoraTable)  # llama.cpp's adapter ids and server-wide scales

    def served_names(self) -> list[str]:
        return [self.base_name, *self.bank.names()]
