"""Multi-adapter serving on one base model.

    bank.py       AdapterBank: adapters of every kind in slots, LRU eviction, pinning, safe replacement
                  (each kind's slot store routes rows: deltaw.adapters.lora.routed, deltaw.adapters.prefix)
    engine.py     Engine: continuous batching with a left-padded KV cache, per-request sampling
    batch.py      the running batch's cache and mask: join, drop rows, trim padding
    sampling.py   SamplingParams, token sampling, incremental text with stop strings
    requests.py   RequestHandle (events, result, cancel) and the engine's statistics
    config.py     ServeConfig: the `deltaw serve` settings
    logprobs.py   token logprobs from each row's own logits, in OpenAI's shapes
    app.py        the OpenAI-compatible HTTP server (`deltaw serve`); completions.py, protocol.py, state.py;
                  vLLM's and llama.cpp's adapter routes (peer_routes.py, llamacpp.py, admin.py)
"""

from deltaw.serve.bank import AdapterBank, AdapterChoice, BankFullError, UnknownAdapterError
from deltaw.serve.engine import Completion, Engine, RequestHandle, TokenEvent, parse_adapter_choice
from deltaw.serve.sampling import SamplingParams

__all__ = [
    "AdapterBank", "AdapterChoice", "BankFullError", "Completion", "Engine", "RequestHandle", "SamplingParams",
    "TokenEvent", "UnknownAdapterError", "parse_adapter_choice",
]
