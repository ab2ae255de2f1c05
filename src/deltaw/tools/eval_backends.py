"""Where `deltaw eval` gets its numbers: deltaw's own serving engine in this process, or any running
OpenAI-compatible server (deltaw serve, vLLM, llama-server) through /v1/completions. Both answer the same
two requests per example and target, with token-id prompts so every engine sees the same tokens:

    score:   prompt = the whole example, echo, max_tokens 1  -> each prompt token's logprob (the loss)
    answer:  prompt = the example's prompt, greedy           -> the text, and the first token's top 20

A server selects a target by `model` (deltaw, vLLM) or, for llama-server, by an explicit `lora` list
(every adapter listed, the target's at scale 1), so its server-wide scales never leak in. A weighted mix
("a*0.5+b*0.5") goes as `model` to a server that lists its members as models (deltaw serve), else as a
`lora` list with those scales.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from deltaw.serve.bank import AdapterChoice
from deltaw.serve.engine import Engine, SamplingParams, parse_adapter_choice
from deltaw.serve.logprobs import MAX_LOGPROBS, TokenLogprob, token_text


class EvalServerError(RuntimeError):
    """A server that cannot be reached, or that refused a request; the message says which and why."""


@dataclass
class Target:
    """One model scored: the base model or an adapter.

    Attributes:
        name: its row in the report.
        choice: what deltaw's engine runs (None: the base model, a name, or a mix).
        fields: what a request to a server carries to select it ("model", and "lora" for llama-server).
    """

    name: str
    choice: AdapterChoice = None
    fields: dict = field(default_factory=dict)


@dataclass
class Job:
    """One completion request: `prompt_ids` continued by `max_tokens` greedy tokens; `echo`: the prompt's logprobs."""

    target: Target
    prompt_ids: list[int]
    max_tokens: int
    echo: bool = False


@dataclass
class Reply:
    """A target's answer to one Job.

    Attributes:
        text: the generated text.
        first_token: the first generated token, as text (None: nothing generated).
        first_top: the most likely first tokens, as text -> logprob (the top 20 and the chosen one).
        prompt_logprobs: with echo: each prompt token's logprob given the ones before it (the first None).
    """

    text: str
    first_token: str | None = None
    first_top: dict[str, float] = field(default_factory=dict)
    prompt_logprobs: list[float | None] | None = None


class LocalBackend:
    """Targets scored in this process by deltaw's serving engine (requests batched as `deltaw serve` batches them)."""

    def __init__(self, engine: Engine, tokenizer) -> None:
        self.engine, self.tokenizer = engine, tokenizer

    def complete_many(self, jobs: Sequence[Job]) -> list[Reply | EvalServerError]:
        handles = [self.engine.submit(job.prompt_ids, job.target.choice, SamplingParams(
            max_tokens=job.max_tokens, logprobs=MAX_LOGPROBS, prompt_logprobs=0 if job.echo else None)) for job in jobs]
        return [self._reply(handle.result()) for handle in handles]

    def _reply(self, completion) -> Reply:
        first: TokenLogprob | None = completion.logprobs[0] if completion.logprobs else None
        top = {} if first is None else {token_text(self.tokenizer, t): lp for t, lp in first.top}
        if first is not None:
            top.setdefault(token_text(self.tokenizer, first.token_id), first.logprob)
        prompt = None if completion.prompt_logprobs is None else [
            None if entry is None else entry.logprob for entry in completion.prompt_logprobs]
        return Reply(completion.text, None if first is None else token_text(self.tokenizer, first.token_id), top,
                     prompt)


class ServerBackend:
    """Targets scored on a running OpenAI-compatible server, `concurrency` requests at a time."""

    def __init__(self, url: str, api_key: str | None = None, concurrency: int = 4, timeout: float = 600.0) -> None:
        self.url, self.concurrency, self.timeout = url.rstrip("/"), concurrency, timeout
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"

    # ----------------------------------------------------------------------------- targets
    def targets(self, adapters: Sequence[str], base: bool = True) -> list[Target]:
        """The base model and each named adapter: a model the server lists, or one of llama-server's adapters
        (by deltaw's `name` or the file's stem)."""
        models = self._request("GET", "/v1/models")["data"]
        base_model = next((model["id"] for model in models if not model.get("parent")), None)
        if base_model is None:
            raise EvalServerError(f"{self.url}/v1/models lists no base model (one without a parent)")
        listed = self._lora_adapters()
        by_name = {entry.get("name") or Path(entry["path"]).stem: entry["id"] for entry in listed}
        model_ids = {model["id"] for model in models}
        targets = [Target("base", fields={"model": base_model, **_lora_fields(listed, {})})] if base else []
        for name in adapters:
            members = _mix_of(name, base_model) or {name: 1.0}
            if members.keys() <= model_ids:  # a model, or a mix of models (deltaw serve takes one as its `model`)
                targets.append(Target(name, fields={"model": name}))
            elif members.keys() <= by_name.keys():
                scales = {by_name[member]: weight for member, weight in members.items()}
                targets.append(Target(name, fields={"model": base_model, **_lora_fields(listed, scales)}))
            else:
                raise EvalServerError(f"--adapter {name}: {self.url} serves no model or llama.cpp adapter named "
                                      f"{name!r} (nor a mix of them such as 'a*0.5+b*0.5'); models: "
                                      f"{sorted(model_ids)}, lora-adapters: {sorted(by_name)}")
        return targets

    def _lora_adapters(self) -> list[dict]:
        """llama-server's (and deltaw's) GET /lora-adapters, or [] where the server has no such route (vLLM)."""
        try:
            listed = self._request("GET", "/lora-adapters")
        except EvalServerError:
            return []
        return listed if isinstance(listed, list) else []

    # ----------------------------------------------------------------------------- requests
    def complete_many(self, jobs: Sequence[Job]) -> list[Reply | EvalServerError]:
        """Echoed jobs one at a time with nothing else in flight (vLLM 0.32's CPU build crashes when a batch
        mixes prompt logprobs and LoRA: "einsum(): subscript b has size ..."), then the rest concurrently."""
        replies: list[Reply | EvalServerError | None] = [None] * len(jobs)
        for index, job in enumerate(jobs):
            if job.echo:
                replies[index] = self._complete(job)
        rest = [index for index, job in enumerate(jobs) if not job.echo]
        with ThreadPoolExecutor(self.concurrency) as pool:
            for index, reply in zip(rest, pool.map(self._complete, [jobs[index] for index in rest])):
                replies[index] = reply
        return replies

    def _complete(self, job: Job) -> Reply | EvalServerError:
        body = {**job.target.fields, "prompt": job.prompt_ids, "max_tokens": job.max_tokens, "temperature": 0,
                "logprobs": 1 if job.echo else MAX_LOGPROBS, **({"echo": True} if job.echo else {})}
        try:
            choice = self._request("POST", "/v1/completions", body)["choices"][0]
        except EvalServerError as exc:
            return exc
        return parse_reply(choice, len(job.prompt_ids) if job.echo else 0)

    def _request(self, method: str, path: str, body: dict | None = None) -> object:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, headers=self.headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.load(response)
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", errors="replace")[:300]
            raise EvalServerError(f"{method} {self.url}{path}: HTTP {exc.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise EvalServerError(f"cannot reach {self.url} ({getattr(exc, 'reason', exc)}); is the server "
                                  "running, and is --url right?") from None


def _mix_of(name: str, base_model: str) -> dict[str, float] | None:
    """{member: weight} when `name` is a weighted mix ("a*0.5+b*0.5", deltaw serve's syntax), else None."""
    try:
        choice = parse_adapter_choice(name, base_model)
    except ValueError:
        return None
    return choice if isinstance(choice, dict) else None


def _lora_fields(listed: list[dict], scales: dict[int, float]) -> dict:
    """An explicit llama.cpp `lora` list: every listed adapter at its scale in `scales` ({id: scale}), the others
    at 0 ({} when the server lists none)."""
    if not listed:
        return {}
    return {"lora": [{"id": entry["id"], "scale": scales.get(entry["id"], 0.0)} for entry in listed]}


def parse_reply(choice: dict, echoed: int) -> Reply:
    """A completions choice as a Reply, from OpenAI's logprobs shape or llama-server's ("content" list);
    `echoed` prompt tokens come first in an echoed answer."""
    logprobs = choice.get("logprobs") or {}
    text = choice.get("text", "")
    if "content" in logprobs:  # llama-server: [{"token", "logprob", "top_logprobs": [{"token", "logprob"}]}]
        first = (logprobs["content"] or [None])[0]
        if first is None:
            return Reply(text)
        top = {item["token"]: item["logprob"] for item in first.get("top_logprobs", [])}
        return Reply(text, first["token"], {first["token"]: first["logprob"], **top})
    tokens, values = logprobs.get("tokens") or [], logprobs.get("token_logprobs") or []
    prompt = [None if value is None else float(value) for value in values[:echoed]] if echoed else None
    if len(tokens) <= echoed:
        return Reply(text, prompt_logprobs=prompt)
    top = dict((logprobs.get("top_logprobs") or [None] * len(tokens))[echoed] or {})
    top.setdefault(tokens[echoed], values[echoed] if values[echoed] is not None else -math.inf)
    return Reply(text, tokens[echoed], top, prompt)
