"""vLLM's and llama.cpp's adapter routes on `deltaw serve`, so their clients and tools work unchanged.

    POST /v1/load_lora_adapter    {"lora_name", "lora_path", "load_inplace"}    vLLM (text: "Success: ...")
    POST /v1/unload_lora_adapter  {"lora_name"}                                 vLLM
    GET  /lora-adapters           [{"id", "path", "scale", "task_name", "prompt_prefix", "name"}]   llama-server
    POST /lora-adapters           [{"id", "scale"}, ...]  -> {"success": true}  llama-server: the server-wide mix

They take the same API key as deltaw's own admin routes, load only from --adapters-dir (a `lora_path` is
relative to it or absolute, and must lead to an entry directly inside it), and answer errors in OpenAI's
shape. As in vLLM, loading a name that is already loaded is a 400 unless `load_inplace` is true; then
requests already running finish on the old weights. The llama.cpp side is in serve/llamacpp.py.
"""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from deltaw.adapters.state import check_adapter_name
from deltaw.serve.admin import bank_call, not_base
from deltaw.serve.llamacpp import lora_mix, lora_names, mix_choice
from deltaw.serve.protocol import LORA_FIELD_ERROR, APIError, LoraScale
from deltaw.serve.state import ServerState

router = APIRouter()
SCALE_LIST = TypeAdapter(list[LoraScale])


class LoadLoRAAdapterRequest(BaseModel):
    """vLLM's POST /v1/load_lora_adapter body."""

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)
    load_inplace: bool = False


class UnloadLoRAAdapterRequest(BaseModel):
    """vLLM's POST /v1/unload_lora_adapter body."""

    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None


def _state(request: Request) -> ServerState:
    return request.app.state.server


# ----------------------------------------------------------------------------- vLLM

@router.post("/v1/load_lora_adapter", response_class=PlainTextResponse)
async def load_lora_adapter(request: Request, body: LoadLoRAAdapterRequest) -> PlainTextResponse:
    state, name = _state(request), body.lora_name
    not_base(state, name, "lora_name")
    try:
        check_adapter_name(name)
    except ValueError as exc:
        raise APIError(400, str(exc), "lora_name", "invalid_adapter") from None
    if name in state.bank.names() and not body.load_inplace:
        raise APIError(400, f"The lora adapter {name!r} has already been loaded. If you want to load the adapter "
                       "in place, set 'load_inplace' to True.", "lora_name", "adapter_exists")
    await bank_call(state, state.bank.load_from_dir, name, body.lora_path, param="lora_path")
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


@router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse)
async def unload_lora_adapter(request: Request, body: UnloadLoRAAdapterRequest) -> PlainTextResponse:
    state, name = _state(request), body.lora_name
    not_base(state, name, "lora_name")
    await bank_call(state, state.bank.unload, name, param="lora_name")
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")


# ----------------------------------------------------------------------------- llama.cpp

@router.get("/lora-adapters")
async def get_lora_adapters(request: Request) -> list[dict]:
    """llama-server's adapter list (the adapters a `lora` list can hold); `name` (deltaw's) is an extra field."""
    state = _state(request)
    table = state.lora_table
    return [{"id": index, "path": str(state.bank.path(name)), "scale": table.scale(name), "task_name": "",
             "prompt_prefix": "", "name": name} for name, index in table.ids(lora_names(state.bank)).items()]


@router.post("/lora-adapters")
async def set_lora_adapters(request: Request) -> dict:
    """Set the server-wide scales (adapters not listed get 0): the mix requests for the base model run."""
    state = _state(request)
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}", code="json_invalid") from None
    if not isinstance(body, list):
        raise APIError(400, "Request body must be an array", code="invalid_lora")
    try:
        mix = lora_mix(state.lora_table, state.bank, SCALE_LIST.validate_python(body))
        state.bank.resolve(mix_choice(mix))
    except ValidationError as exc:
        raise _scale_list_error(exc) from None
    except (ValueError, KeyError) as exc:  # an unknown id, a kind that cannot mix, an adapter gone meanwhile
        raise APIError(400, str(exc), code="invalid_lora") from None
    state.lora_table.set_scales(mix)
    return {"success": True}


def _scale_list_error(exc: ValidationError) -> APIError:
    """A 400 for a bad POST /lora-adapters body: an out-of-range scale names its entry ("0.scale"); any other
    problem (a missing key, a scale that is not a number) gets llama-server's message."""
    first = exc.errors()[0]
    if first["type"] != "value_error":
        return APIError(400, LORA_FIELD_ERROR.replace("'lora'", "the body"), code="invalid_lora")
    param = ".".join(str(part) for part in first["loc"])
    return APIError(400, f"{param}: {first['msg'].removeprefix('Value error, ')}", param, "invalid_lora")
