"""One generation request, from a validated body to a JSON completion or an SSE stream.

The engine runs in its own thread; a request's TokenEvents are awaited on the event loop, which the
engine thread wakes for each event (`RequestHandle.next_event_async`), so the loop never blocks while a
token is being computed and no thread waits per request. A request
that fails inside the engine gets an error; the others continue.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from fastapi import Request
from jinja2 import TemplateError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from deltaw.models.chat import chat_inputs
from deltaw.serve.bank import AdapterChoice, BankFullError, UnknownAdapterError
from deltaw.serve.engine import Completion, RequestHandle, SamplingParams, TokenEvent, parse_adapter_choice
from deltaw.serve.llamacpp import request_choice
from deltaw.serve.logprobs import LogprobsFormat, TokenLogprob
from deltaw.serve.state import ServerState
from deltaw.serve.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    chat_choice,
    chat_delta,
    error_body,
    new_id,
    response_body,
    text_choice,
    usage,
)

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context


@dataclass
class Generation:
    """A submitted request: its handle, the label metrics count it under, its clock (perf_counter), and what
    its answer carries besides the text: logprobs in its endpoint's shape, the prompt echoed (completions)."""

    handle: RequestHandle
    model: str
    label: str
    endpoint: str
    start: float
    logprobs: LogprobsFormat | None = None
    prompt_ids: list[int] = field(default_factory=list)
    echo: str | None = None

    def logprobs_body(self, entries: list[TokenLogprob | None], tokens: list[int] | None = None) -> dict | None:
        """`entries` in the endpoint's shape, or None when the request asked for no logprobs."""
        return None if self.logprobs is None or not entries else self.logprobs(entries, tokens)

    def prompt_logprobs(self) -> dict | None:
        """The echoed prompt's logprobs (after the first event: the engine sets them before it)."""
        entries = self.handle.prompt_logprobs or [None] * len(self.prompt_ids)
        return self.logprobs_body(entries, self.prompt_ids)


def resolve_model(state: ServerState, model: str) -> None | str | dict[str, float]:
    """The request's `model` -> None (base), an adapter name, or {name: weight}; 404 for unknown names."""
    return _checked_choice(state, "model", lambda: parse_adapter_choice(model, state.base_name))


def pick_adapters(state: ServerState, body: ChatRequest | CompletionRequest) -> None | str | dict[str, float]:
    """What the request runs: its `model`, or llama.cpp's `lora` list, or the server-wide scales (llamacpp.py)."""
    choice = resolve_model(state, body.model)
    return _checked_choice(state, "lora", lambda: request_choice(state.lora_table, state.bank, choice, body.lora))


def _checked_choice(state: ServerState, field_name: str, pick: Callable[[], AdapterChoice]) -> AdapterChoice:
    """`pick()`'s choice once the bank knows every name in it (404) and can run it (400 naming `field_name`)."""
    try:
        choice = pick()
        state.bank.resolve(choice)
    except UnknownAdapterError as exc:
        raise unknown_model(state, exc.name) from None
    except ValueError as exc:
        raise APIError(400, f"{field_name}: {exc}", field_name, f"invalid_{field_name}") from None
    return choice


def unknown_model(state: ServerState, name: str) -> APIError:
    return APIError(404, f"model {name!r} is not served here; available models: {', '.join(state.served_names())}"
                    " (load another adapter with POST /v1/adapters)", "model", "model_not_found", "not_found_error")


def check_prompt_text(state: ServerState, body: ChatRequest | CompletionRequest) -> None:
    """400, before any tokenizing, for prompt text that is not valid Unicode (a lone surrogate, which
    JSON's \\u escapes allow) or too long to fit the model length limit whatever its tokens: more
    UTF-8 bytes than max_model_len tokens can stand for (ServerState.max_prompt_bytes)."""
    chat = isinstance(body, ChatRequest)
    param = "messages" if chat else "prompt"
    texts = ([message.as_template_message()["content"] for message in body.messages] if chat
             else [body.prompt] if isinstance(body.prompt, str) else [])
    try:
        size = sum(len(text.encode("utf-8")) for text in texts)
    except UnicodeEncodeError as exc:
        raise APIError(400, f"{param}: not valid Unicode text (a lone surrogate {exc.object[exc.start]!r}); "
                       "send the text as it is, not as UTF-16 halves", param, "invalid_text") from None
    limit = state.max_prompt_bytes()
    if size > limit:
        raise APIError(400, f"the prompt's text is {size:,} bytes, more than {state.engine.max_model_len} tokens "
                       f"(the model length limit) can hold ({limit:,} bytes at most); shorten the prompt",
                       param, "prompt_too_long")


def prompt_ids(state: ServerState, body: ChatRequest | CompletionRequest) -> list[int]:
    """Token ids of the prompt: chat messages through the tokenizer's chat template, or the raw prompt.
    Runs on a worker thread (a long prompt takes seconds to tokenize)."""
    if isinstance(body, CompletionRequest):
        return body.prompt if isinstance(body.prompt, list) else state.tokenizer(body.prompt)["input_ids"]
    try:
        inputs = chat_inputs(state.tokenizer, [message.as_template_message() for message in body.messages])
    except (TemplateError, ValueError, TypeError) as exc:  # a template may reject a conversation
        raise APIError(400, f"messages: the chat template refused them: {exc}", "messages") from None
    return inputs["input_ids"][0].tolist()


def sampling_params(state: ServerState, body: ChatRequest | CompletionRequest, prompt_length: int) -> SamplingParams:
    """The request's sampling parameters; max_tokens defaults to 16 (completions) or the rest of the context (chat)."""
    max_tokens = body.token_limit()
    if max_tokens is None:
        chat_default = max(state.engine.max_model_len - prompt_length, 1)
        max_tokens = DEFAULT_COMPLETION_TOKENS if isinstance(body, CompletionRequest) else chat_default
    echo = isinstance(body, CompletionRequest) and body.echo
    return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                          stop=list(body.stop), seed=body.seed, logprobs=body.logprobs_count(),
                          prompt_logprobs=body.logprobs_count() if echo else None, ignore_eos=body.ignore_eos)


async def submit(state: ServerState, body: ChatRequest | CompletionRequest, endpoint: str) -> Generation:
    """Check the request against the served models and queue it on the engine.

    Tokenizing (and rendering the chat template) runs on a worker thread, after a size check that
    refuses a prompt too long to fit without tokenizing it. The engine checks the prompt and
    parameters (a ValueError is a 400, naming the field when it is a sampling parameter) and acquires
    the adapters' slots, which may read an evicted adapter back from disk: that runs on a worker
    thread too, so the event loop never waits on either.
    """
    start = time.perf_counter()
    loop = asyncio.get_running_loop()
    choice = pick_adapters(state, body)
    check_prompt_text(state, body)
    ids = await loop.run_in_executor(state.waiters, prompt_ids, state, body)
    params = sampling_params(state, body, len(ids))
    try:
        handle = await loop.run_in_executor(state.waiters, state.engine.submit, ids, choice, params)
    except UnknownAdapterError as exc:  # unloaded between the check and the submit
        raise unknown_model(state, exc.name) from None
    except ValueError as exc:
        raise APIError(400, str(exc), getattr(exc, "field", None), "invalid_request") from None
    except (BankFullError, RuntimeError) as exc:  # every slot busy, or shutting down: retry later
        raise APIError(503, str(exc), code="unavailable", kind="server_error") from None
    label = "mix" if isinstance(choice, dict) else choice or state.base_name
    chat = isinstance(body, ChatRequest)
    logprobs = None if body.logprobs_count() is None else LogprobsFormat(state.tokenizer, chat)
    echo = None
    if not chat and body.echo:
        echo = body.prompt if isinstance(body.prompt, str) else state.tokenizer.decode(ids)
    return Generation(handle, body.model, label, endpoint, start, logprobs, list(ids), echo)


async def next_event(state: ServerState, generation: Generation) -> TokenEvent:
    """The request's next TokenEvent, awaited on the event loop; a failed generation is a 500 for it alone."""
    handle = generation.handle
    event = await handle.next_event_async()
    if event.finish_reason == "error":
        raise APIError(500, f"generation failed: {handle.error}", kind="server_error", code="generation_failed")
    return event


async def finish(state: ServerState, generation: Generation) -> Completion:
    """The engine's final Completion; counts the request in the metrics."""
    handle = generation.handle
    completion = handle.result() if handle.done else await asyncio.get_running_loop().run_in_executor(
        state.waiters, handle.result)
    first_token = None if handle.first_token_at is None else handle.first_token_at - generation.start
    state.metrics.record_request(generation.label, generation.endpoint, completion.prompt_tokens,
                                 completion.completion_tokens, time.perf_counter() - generation.start, first_token)
    return completion


async def collect(state: ServerState, generation: Generation, request: Request) -> Completion | None:
    """Run a request to its end (cancelled if the client goes away) and return its Completion."""
    done = False
    try:
        while (await next_event(state, generation)).finish_reason is None:
            if await request.is_disconnected():
                return None
        done = True
        return await finish(state, generation)
    finally:
        if not done:
            generation.handle.cancel()


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def stream_events(state: ServerState, generation: Generation, chat: bool,
                        include_usage: bool) -> AsyncIterator[str]:
    """The SSE body: one chunk per token event, a finish chunk, optionally a usage chunk, then [DONE].

    A client that disconnects cancels the generator (Starlette cancels the response task), which
    cancels the engine request in `finally`.
    """
    request_id, created = new_id("chatcmpl" if chat else "cmpl"), int(time.time())
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, finish_reason: str | None, first: bool = False, usage_: dict | None = None,
              logprobs: dict | None = None) -> str:
        if usage_ is not None:
            choices = []
        elif chat:
            delta = {"role": "assistant", "content": ""} if first else {} if text is None else {"content": text}
            choices = [chat_delta(delta, finish_reason, logprobs)]
        else:
            choices = [text_choice(text or "", finish_reason, logprobs)]
        return sse(response_body(request_id, kind, generation.model, choices, usage_, created))

    done, pending = False, []  # pending: logprobs of tokens whose text is still held back
    try:
        if chat:
            yield chunk(None, None, first=True)
        while True:
            try:
                event = await next_event(state, generation)
            except APIError as exc:  # the engine failed this request: tell the client, end the stream
                state.metrics.record_error(exc.status)
                yield sse(exc.body())
                break
            if generation.echo is not None:  # the prompt first (its logprobs exist once the first event came)
                yield chunk(generation.echo, None, logprobs=generation.prompt_logprobs())
                generation.echo = None
            pending += [event.logprob] if event.logprob is not None else []
            if event.text:
                yield chunk(event.text, None, logprobs=generation.logprobs_body(pending))
                pending = []
            if event.finish_reason is not None:
                done = True
                completion = await finish(state, generation)
                yield chunk(None, completion.finish_reason, logprobs=generation.logprobs_body(pending))
                if include_usage:
                    yield chunk(None, None, usage_=usage(completion.prompt_tokens, completion.completion_tokens))
                break
        yield sse("[DONE]")
    finally:
        if not done:
            generation.handle.cancel()


async def respond(state: ServerState, body: ChatRequest | CompletionRequest, request: Request,
                  chat: bool) -> Response | dict:
    """Submit `body` and answer with an SSE stream or one JSON completion."""
    generation = await submit(state, body, "chat" if chat else "completions")
    if body.stream:
        return StreamingResponse(stream_events(state, generation, chat, body.include_usage()),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    completion = await collect(state, generation, request)
    if completion is None:  # the client left; nobody reads this
        return JSONResponse(error_body("client disconnected", "invalid_request_error"), 499)
    choice = final_choice(generation, completion, chat)
    return response_body(new_id("chatcmpl" if chat else "cmpl"), "chat.completion" if chat else "text_completion",
                         body.model, [choice], usage(completion.prompt_tokens, completion.completion_tokens))


def final_choice(generation: Generation, completion: Completion, chat: bool) -> dict:
    """The one choice of an answer sent whole: its text (after the echoed prompt) and its logprobs if asked."""
    if chat:
        return chat_choice(completion.text, completion.finish_reason, generation.logprobs_body(completion.logprobs))
    text, entries, tokens = completion.text, list(completion.logprobs), [e.token_id for e in completion.logprobs]
    if generation.echo is not None:
        prompt = completion.prompt_logprobs or [None] * len(generation.prompt_ids)
        text, entries, tokens = generation.echo + text, prompt + entries, generation.prompt_ids + tokens
    return text_choice(text, completion.finish_reason, generation.logprobs_body(entries, tokens))
