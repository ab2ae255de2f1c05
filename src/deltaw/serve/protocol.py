"""The OpenAI wire format: request models (validated by pydantic), response and chunk bodies, error bodies.

Only what deltaw serves is modelled: chat and text completions with one choice, logprobs (and `echo` on
completions), and llama.cpp's per-request `lora` list. Fields that OpenAI clients send and that change
nothing here (`user`, `metadata`, ...) are accepted and ignored; fields that would change the result and
are not implemented (penalties, `n` > 1, ...) are refused with a 400 naming the field, rather than
silently ignored.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from deltaw.serve.engine import MAX_MIX_WEIGHT
from deltaw.serve.logprobs import MAX_LOGPROBS

# Fields OpenAI defines that deltaw does not implement, with the value that means "off".
UNSUPPORTED_UNLESS = {"frequency_penalty": (None, 0), "presence_penalty": (None, 0), "logit_bias": (None, {}),
                      "best_of": (None, 1), "suffix": (None, ""), "tools": (None, []), "response_format": (None,)}
LORA_FIELD_ERROR = "'lora' must be an array of objects with 'id' and 'scale' fields"  # llama-server's words


class APIError(Exception):
    """An error returned to the client as {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class LoraScale(BaseModel):
    """One entry of llama.cpp's `lora` list: the adapter with this id (GET /lora-adapters) at this scale. Other
    keys are ignored, as llama-server does (a client may send back the entries GET /lora-adapters listed). A
    scale is bounded as a mix weight in `model` is: [-MAX_MIX_WEIGHT, MAX_MIX_WEIGHT]."""

    id: int
    scale: float = Field(allow_inf_nan=False)

    @field_validator("scale")
    @classmethod
    def _bounded(cls, scale: float) -> float:
        if abs(scale) > MAX_MIX_WEIGHT:
            raise ValueError(f"{scale:g} is outside [-{MAX_MIX_WEIGHT:g}, {MAX_MIX_WEIGHT:g}], the bound of every "
                             "adapter's weight in a mix")
        return scale


class SamplingRequest(BaseModel):
    """The fields chat and text completions share."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = Field(default=None, validate_default=True)
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    lora: list[LoraScale] | None = None
    ignore_eos: bool = False  # vLLM's and llama.cpp's extension: generate max_tokens whatever the model says

    @field_validator("lora", mode="before")
    @classmethod
    def _lora_list(cls, lora: Any) -> Any:
        if lora is not None and not (isinstance(lora, list) and all(isinstance(item, dict) for item in lora)):
            raise ValueError(LORA_FIELD_ERROR)
        return lora

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"only n=1 is supported, found n={n}; send {n} requests instead")
        return n

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop: str | list[str] | None) -> list[str]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not text for text in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> SamplingRequest:
        for name, value in (self.model_extra or {}).items():
            if name in UNSUPPORTED_UNLESS and value not in UNSUPPORTED_UNLESS[name]:
                raise ValueError(f"'{name}' is not supported by deltaw serve; leave it out")
        return self

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, content: Any) -> Any:
        if isinstance(content, list):
            kinds = {part.get("type") if isinstance(part, dict) else type(part).__name__ for part in content}
            if kinds - {"text"}:
                raise ValueError(f"only text content parts are supported, found {sorted(map(str, kinds - {'text'}))}")
        elif not isinstance(content, str):
            raise ValueError(f"content must be a string or a list of text parts, found {type(content).__name__}")
        return content

    def as_template_message(self) -> dict[str, str]:
        """The {"role", "content"} dict the chat template reads (text parts joined; developer -> system)."""
        text = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("'top_logprobs' needs 'logprobs': true")
        return self

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def logprobs_count(self) -> int | None:
        """Alternatives per generated token (None: no logprobs)."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[str] | list[int] | list[list[int]]) -> str | list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ValueError(f"one prompt per request is supported, found {len(prompt)}")
            prompt = prompt[0]
        if not prompt:
            raise ValueError("the prompt is empty")
        return prompt

    def token_limit(self) -> int | None:
        return self.max_tokens

    def logprobs_count(self) -> int | None:
        """Alternatives per generated (and, with echo, prompt) token (None: no logprobs)."""
        return self.logprobs


class AdapterLoadRequest(BaseModel):
    """POST /v1/adapters: load (or replace) `<adapters_dir>/<name>` under `name`."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    pin: bool = False


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_choice(text: str, finish_reason: str, logprobs: dict | None = None) -> dict[str, Any]:
    return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": finish_reason}


def chat_delta(delta: dict[str, str], finish_reason: str | None, logprobs: dict | None = None) -> dict[str, Any]:
    return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def text_choice(text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict[str, Any]:
    return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def response_body(request_id: str, kind: str, model: str, choices: list[dict], usage_: dict | None,
                  created: int | None = None) -> dict:
    """A completion, or a stream chunk (`usage_` None until the usage chunk; `created` the same in every chunk)."""
    created = int(time.time()) if created is None else created
    return {"id": request_id, "object": kind, "created": created, "model": model,
            "system_fingerprint": None, "choices": choices, "usage": usage_}

