"""What the admin routes share (deltaw's, vLLM's and llama.cpp's): bank operations run on a worker thread,
their errors mapped to HTTP statuses, and the check that a name is an adapter, not the base model."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from deltaw.adapters import AdapterFormatError
from deltaw.serve.bank import BankFullError, UnknownAdapterError
from deltaw.serve.protocol import APIError
from deltaw.serve.state import ServerState


async def bank_call(state: ServerState, action: Callable, *args: object, param: str = "name") -> None:
    """Run a bank operation on a thread (loading reads files) and map its errors to HTTP statuses; `param`
    names the request field the error is about."""
    try:
        await asyncio.to_thread(action, *args)
    except (UnknownAdapterError, FileNotFoundError) as exc:
        raise APIError(404, str(exc), param, "adapter_not_found", kind="not_found_error") from None
    except BankFullError as exc:
        raise APIError(503, str(exc), code="bank_full", kind="server_error") from None
    except (AdapterFormatError, ValueError) as exc:
        raise APIError(400, str(exc), param, "invalid_adapter") from None


def not_base(state: ServerState, name: str, param: str = "name") -> None:
    """A 400 if `name` is the base model's name (it is not an adapter)."""
    if name == state.base_name:
        raise APIError(400, f"{name!r} is the base model, not an adapter", param, "invalid_adapter")
