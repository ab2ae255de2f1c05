"""Multi-adapter serving: the adapter bank (bank.py), per-row routed layers (routed.py) and the
continuously batching engine (engine.py)."""

from deltaw.serve.bank import AdapterBank, AdapterChoice, BankFullError, UnknownAdapterError
from deltaw.serve.engine import Completion, Engine, RequestHandle, TokenEvent, parse_adapter_choice
from deltaw.serve.sampling import SamplingParams

__all__ = [
    "AdapterBank", "AdapterChoice", "BankFullError", "Completion", "Engine", "RequestHandle", "SamplingParams",
    "TokenEvent", "UnknownAdapterError", "parse_adapter_choice",
]
