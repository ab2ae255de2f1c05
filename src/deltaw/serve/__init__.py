"""Multi-adapter serving on one base model.

    bank.py       AdapterBank: adapters in stacked slots, LRU eviction, pinning, safe replacement
    routed.py     RoutedLinear: each batch row gets its own adapter (or mix) in one batched computation
    engine.py     Engine: continuous batching with a left-padded KV cache, per-request sampling
    batch.py      the running batch's cache and mask: join, drop rows, trim padding
    sampling.py   SamplingParams, token sampling, incremental text with stop strings
    requests.py   RequestHandle (events, result, cancel) and the engine's statistics
    app.py        the OpenAI-compatible HTTP server (`deltaw serve`)
"""

from deltaw.serve.bank import AdapterBank, AdapterChoice, BankFullError, UnknownAdapterError
from deltaw.serve.engine import Completion, Engine, RequestHandle, TokenEvent, parse_adapter_choice
from deltaw.serve.sampling import SamplingParams

__all__ = [
    "AdapterBank", "AdapterChoice", "BankFullError", "Completion", "Engine", "RequestHandle", "SamplingParams",
    "TokenEvent", "UnknownAdapterError", "parse_adapter_choice",
]
