"""The OpenAI-compatible HTTP server: chat and text completions, streaming or not, one adapter per request.

    client --HTTP--> route (validate, tokenize) --submit--> Engine thread: continuous batching,
       ^                                                    one AdapterBank slot per row
       +---- JSON / SSE chunks <---- TokenEvents, awaited on worker threads (the event loop never blocks)

`model` in a request picks the adapter: an adapter's name, the base model's name, or a weighted mix
"pirate*0.5+robot*0.5". An unknown name is a 404 listing the served names, never the base model.
Admin routes load, unload, pin and unpin adapters from the adapters directory while traffic runs;
vLLM's and llama.cpp's adapter routes do the same for their clients (serve/peer_routes.py).
Every /v1 route and /lora-adapters need `Authorization: Bearer KEY` when the server has an API key;
/health, /metrics and the API's description (/docs, /redoc, /openapi.json) stay open. A request body
over --max-request-bytes is a 413 before it is read (serve/bodylimit.py). Every error, including
FastAPI's own validation errors, has OpenAI's shape {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import logging
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Literal

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send
from transformers import PreTrainedTokenizerBase

from deltaw.adapters import parse_adapter_spec
from deltaw.models.loading import DTYPES, load_model
from deltaw.serve.admin import bank_call, not_base
from deltaw.serve.bank import AdapterBank
from deltaw.serve.bodylimit import BodyLimitMiddleware
from deltaw.serve.completions import respond
from deltaw.serve.config import MAX_REQUEST_BYTES, ServeConfig
from deltaw.serve.engine import Engine
from deltaw.serve.peer_routes import router as peer_router
from deltaw.serve.state import ServerState
from deltaw.serve.protocol import AdapterLoadRequest, APIError, ChatRequest, CompletionRequest, error_body

SHUTDOWN_GRACE_S = 5  # on Ctrl-C, running streams get this long before they are cut (and their requests cancelled)


def create_app(engine: Engine, bank: AdapterBank, tokenizer: PreTrainedTokenizerBase, base_name: str,
               api_key: str | None = None, max_request_bytes: int = MAX_REQUEST_BYTES) -> FastAPI:
    """The FastAPI application over a started `engine` (the caller starts and shuts the engine down).

    Args:
        engine: a `deltaw.serve.engine.Engine` generating with `bank`'s adapters.
        bank: the engine's `AdapterBank`, which the admin routes load into.
        tokenizer: the base model's tokenizer (chat template included).
        base_name: the `model` name that selects the base model with no adapter.
        api_key: when set, every /v1 route needs `Authorization: Bearer <api_key>`.
        max_request_bytes: a larger request body is answered 413 before it is read.
    """
    if base_name in bank.names():
        raise ValueError(f"an adapter is named {base_name!r} like the base model; rename one of them")
    app = FastAPI(title="deltaw", summary="Many LoRA adapters on one base model, OpenAI-compatible API")
    app.state.server = ServerState(engine, bank, tokenizer, base_name, api_key)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_request_bytes)
    app.add_middleware(ApiKeyMiddleware, api_key=api_key)  # added last, so it runs first
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
    app.include_router(router)
    app.include_router(peer_router)
    return app


PROTECTED_PATHS = ("/v1", "/lora-adapters")  # what needs the API key (llama.cpp's admin route included)


class ApiKeyMiddleware:
    """Refuses /v1 and /lora-adapters requests without `Authorization: Bearer KEY`, before the body is read.

    The scheme is case-insensitive ("bearer KEY" too, as RFC 7235 says); the key is compared in
    constant time.
    """

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app, self.expected = app, api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.expected is None or scope["type"] != "http" or not scope["path"].startswith(PROTECTED_PATHS):
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, key = given.strip().partition(b" ")
        if scheme.lower() == b"bearer" and secrets.compare_digest(key.strip(), self.expected):
            return await self.app(scope, receive, send)
        message = ("missing API key: send the header 'Authorization: Bearer KEY'" if not given
                   else "invalid API key: the Authorization header does not match the server's --api-key")
        scope["app"].state.server.metrics.record_error(401)
        response = JSONResponse(error_body(message, "invalid_request_error", None, "invalid_api_key"), 401,
                                headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


# ----------------------------------------------------------------------------- errors

def _state(request: Request) -> ServerState:
    return request.app.state.server


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    _state(request).metrics.record_error(exc.status)
    return JSONResponse(exc.body(), exc.status)


TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}  # pydantic names union members in `loc`


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 becomes OpenAI's 400, with one message naming the field and the problem."""
    first = exc.errors()[0]
    path = [str(part) for part in first["loc"][1:]
            if not (isinstance(part, str) and ("[" in part or part in TYPE_TAGS))]
    param = ".".join(path) or None
    if first["type"] == "json_invalid":
        reason = first.get("ctx", {}).get("error", "malformed JSON")
        message, param = f"the request body is not valid JSON: {reason}", None
    elif first["type"] == "model_attributes_type":
        message = "the request body must be a JSON object, sent with 'Content-Type: application/json'"
    elif first["type"] == "missing" and param is None:
        message = "the request body is empty: send a JSON object, with 'Content-Type: application/json'"
    elif first["type"] == "missing":
        message = f"missing required field '{param}'"
    else:
        message = f"{param or 'body'}: {first['msg']}".replace("Value error, ", "")
    more = len(exc.errors()) - 1
    message += f" (and {more} more problem{'s' * (more > 1)})" if more else ""
    return await _api_error(request, APIError(400, message, param, first["type"]))


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return await _api_error(request, APIError(exc.status_code, message, kind=kind))


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    _state(request).metrics.record_error(500)
    return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"), 500)


# ----------------------------------------------------------------------------- routes

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> dict:
    state = _state(request)
    return {"status": "ok", "model": state.base_name, "adapters": state.bank.names(),
            "resident": state.bank.resident(), "memory_bytes": state.bank.memory_bytes(),
            "uptime_s": int(time.time()) - state.started}


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> PlainTextResponse:
    state = _state(request)
    stats, memory = state.engine.stats(), state.bank.memory_bytes()
    gauges = {
        "deltaw_requests_running": ("Requests in the running batch.", stats.get("requests_running", 0)),
        "deltaw_requests_waiting": ("Requests queued for the batch.", stats.get("requests_waiting", 0)),
        "deltaw_adapters_known": ("Adapters the server can serve (resident or evicted).", len(state.bank.names())),
        "deltaw_adapters_resident": ("Adapters in a slot of the bank now.", len(state.bank.resident())),
        "deltaw_base_memory_bytes": ("Base model parameters and buffers.", memory.get("base", 0)),
        "deltaw_adapter_memory_bytes": ("The bank's adapter slot buffers.", memory.get("adapters", 0)),
    }
    return PlainTextResponse(state.metrics.render(gauges), media_type="text/plain; version=0.0.4")


def _model_card(state: ServerState, name: str) -> dict:
    resident, pinned = name in state.bank.resident(), name in state.bank.pinned()
    base = name == state.base_name
    return {"id": name, "object": "model", "created": state.started, "owned_by": "deltaw",
            "parent": None if base else state.base_name, "resident": base or resident, "pinned": base or pinned}


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    state = _state(request)
    return {"object": "list", "data": [_model_card(state, name) for name in state.served_names()]}


@router.get("/v1/models/{name}")
async def get_model(request: Request, name: str) -> dict:
    state = _state(request)
    if name not in state.served_names():
        raise APIError(404, f"no model {name!r}; available models: {', '.join(state.served_names())}", "model",
                       "model_not_found", kind="not_found_error")
    return _model_card(state, name)


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(request: Request, body: ChatRequest) -> Response | dict:
    return await respond(_state(request), body, request, chat=True)


@router.post("/v1/completions", response_model=None)
async def completions(request: Request, body: CompletionRequest) -> Response | dict:
    return await respond(_state(request), body, request, chat=False)


# ----------------------------------------------------------------------------- admin

@router.post("/v1/adapters")
async def load_adapter(request: Request, body: AdapterLoadRequest) -> dict:
    """Load (or replace) `<adapters_dir>/<name>`; requests already running on an old version finish on it."""
    state = _state(request)
    not_base(state, body.name)
    await bank_call(state, state.bank.load_from_dir, body.name)
    if body.pin:
        await bank_call(state, state.bank.pin, body.name)
    return _model_card(state, body.name)


@router.delete("/v1/adapters/{name}")
async def unload_adapter(request: Request, name: str) -> dict:
    state = _state(request)
    not_base(state, name)
    await bank_call(state, state.bank.unload, name)
    return {"id": name, "object": "model", "deleted": True}


@router.post("/v1/adapters/{name}/{action}")
async def pin_adapter(request: Request, name: str, action: Literal["pin", "unpin"]) -> dict:
    """pin: keep the adapter resident (loading it back if it was evicted); unpin: let it be evicted again."""
    state = _state(request)
    not_base(state, name)
    await bank_call(state, state.bank.pin if action == "pin" else state.bank.unpin, name)
    return _model_card(state, name)


# ----------------------------------------------------------------------------- running it

def build_engine(config: ServeConfig) -> tuple[Engine, AdapterBank, PreTrainedTokenizerBase]:
    """Load the base model once, its adapter bank with each 'name=DIR' adapter, and a started engine.

    Returns:
        (engine, bank, tokenizer); call `engine.shutdown()` when done.
    """
    model, tokenizer = load_model(config.model, dtype=DTYPES[config.weights_dtype()])
    bank = AdapterBank(model, max_resident=config.max_resident, adapters_dir=config.adapters_dir)
    for spec in config.adapter:
        name, path = parse_adapter_spec(spec)
        bank.load(name, path)
    engine = Engine(model, tokenizer, bank, max_batch_size=config.max_batch_size, max_model_len=config.max_model_len,
                    prefill_chunk=config.prefill_chunk)
    engine.start()
    return engine, bank, tokenizer


def serve(config: ServeConfig) -> None:
    """Serve `config.model` and its adapters over HTTP until interrupted (what `deltaw serve` runs).

    The base model answers to the name `config.model` (a directory's last component when it is a path).
    """
    config.check()
    listener = listen(config.host, config.port)  # before the model loads: a taken port fails at once
    engine, bank, tokenizer = build_engine(config)
    try:
        app = create_app(engine, bank, tokenizer, base_model_name(config.model), config.api_key,
                         config.max_request_bytes)
        server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level,
                                               timeout_graceful_shutdown=SHUTDOWN_GRACE_S))
        logging.getLogger("uvicorn.error").info("deltaw serve: listening on http://%s:%d", config.host, config.port)
        server.run(sockets=[listener])
    finally:
        engine.shutdown()
        listener.close()


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), as uvicorn binds one; ValueError naming the flags if it cannot be."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family=family)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as exc:
        listener.close()
        raise ValueError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc}); "
                         "pick a free port, or an address of this machine") from None
    listener.set_inheritable(True)
    return listener


def base_model_name(model: str) -> str:
    """The `model` name clients use for the base model: the name given, or a directory's last component."""
    return Path(model.rstrip("/")).name if "/" in model else model


class BackgroundServer:
    """Runs an app with uvicorn on a thread (tests, notebooks): `with BackgroundServer(app) as url: ...`.

    Port 0 picks a free port; `url` is the server's base URL, e.g. "http://127.0.0.1:43121".
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="deltaw-uvicorn", daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server thread stopped before it started (see the log above)")
            time.sleep(0.01)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    def __exit__(self, *exc_info) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
