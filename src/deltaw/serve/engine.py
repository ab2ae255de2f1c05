"""Continuous batching: many requests, each with its own adapter (or mix, or none), one base model.

A scheduler thread repeats:  admit newcomers (prefill them together)  →  one decode step for every
running row  →  drop finished rows. A request submitted mid-generation joins at the next step.

The batch and its KV cache (one transformers DynamicCache, LEFT padded):

               cache columns (oldest → newest)            attention_mask     position of next token
    row 0   [ k k k k k k k k k k k k ]                  1 1 1 1 1 1 1 1 1 1 1 1      12
    row 1   [ · · · · · k k k k k k k ]                  0 0 0 0 0 1 1 1 1 1 1 1       7
    row 2   [ · · · · · · · · · k k k ]  (joined late)   0 0 0 0 0 0 0 0 0 1 1 1       3

    keys/values per layer: [rows, kv_heads, columns, head_dim]; `·` = zero padding, masked out.

- Prefill: newcomers are left-padded to their longest prompt and run in one forward with a fresh
  cache; their first token is sampled from it. A step prefills at most `prefill_chunk` tokens: newcomers
  are admitted while their padded prompts fit, and a longer prompt is prefilled alone, one chunk per
  step (chunked prefill), so running rows keep decoding meanwhile.
- Join: both caches are left-padded to the same column count and concatenated along the batch.
- Decode: every row feeds its last token with position_ids = its count of real tokens and the mask
  extended by one column, so a row computes exactly what it would compute alone (padding is masked
  and positions are its own).
- Leave: finished or cancelled rows are dropped with index_select; columns that are padding in
  every remaining row are trimmed from the left.

Each row carries a Route (its adapters' slots and weights in the bank); every forward first routes the
batch's rows through the bank, whose per-kind stores make each row compute its own adapter (LoRA: its
delta in every routed linear layer; prefix-tuning: its keys/values in front at the attention
interface; no route: the base model). The forward runs under `bank.forward_lock`, so adapters loaded,
replaced or evicted meanwhile are never seen half-written (while requests are checked and admitted).

A bad request fails alone: a row whose logits are not finite (e.g. a mix with absurd weights) or
whose sampling throws ends with finish_reason "error" while the batch runs on; a failed prefill ends
only its newcomers. Only a decode forward that throws (a device failure) ends the whole batch.

Logprobs (serve/logprobs.py) come from each row's own logits: a sampled token's, and with `echo` the
prompt's, for which a prefill keeps the logits of every prompt position (such requests are prefilled in
groups whose logits fit in PROMPT_LOGITS_BYTES).
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections import deque
from dataclasses import dataclass

import torch
from torch import nn
from transformers import Cache

from deltaw import compat
from deltaw.adapters.state import check_adapter_name
from deltaw.serve.bank import AdapterBank, AdapterChoice, Route, UnknownAdapterError
from deltaw.serve.batch import join, keep_rows, prompt_batch
from deltaw.serve.logprobs import TokenLogprob, prompt_logprobs, token_logprobs
from deltaw.serve.requests import Completion, EngineStats, RequestHandle, TokenEvent, summarize  # noqa: F401 (re-exported)
from deltaw.serve.sampling import SamplingParams, TextStream, sample_token

MAX_MIX_WEIGHT = 100.0  # |weight| of one adapter in a mix requested by name ("pirate*0.5+robot*0.5")

__all__ = [
    "Completion", "Engine", "RequestHandle", "SamplingParams", "TokenEvent", "UnknownAdapterError",
    "parse_adapter_choice", "summarize",
]

PREFILL_CHUNK = 512
"""Prompt tokens per step (Engine's prefill_chunk and `deltaw serve --prefill-chunk`). 512 against 256, 64 clients
mixed over HTTP on the bundled model, alternating, one thread: TTFT p50 1.65-1.87 s vs 2.09-2.61 s, 312-320 vs
252-274 tok/s; a long prompt's chunk then holds running rows for about twice as long (~0.3 s)."""
PROMPT_LOGITS_BYTES = 1 << 28  # a prefill returning prompt logprobs keeps [rows, columns, vocab] float32 logits


@dataclass
class _Row:
    """A running request: its handle, route (its adapters' slots), sampling state and real-token count in the cache."""

    handle: RequestHandle
    route: Route
    params: SamplingParams
    generator: torch.Generator | None
    stream: TextStream
    prompt_ids: list[int]
    length: int = 0  # real tokens in the cache for this row
    last_token: int = -1
    finished: bool = False


@dataclass
class _Chunked:
    """A long prompt being prefilled alone, chunk by chunk: its row, its own cache, and its tokens done so far."""

    row: _Row
    cache: Cache
    done: int = 0


class Engine:
    """Batched generation for many adapters on one base model, with continuous batching.

    Args:
        model: the base causal LM the bank wraps (fp32 by default; a bf16 model runs in bf16).
        tokenizer: its tokenizer (decodes output; gives EOS).
        bank: the AdapterBank built on `model`.
        max_batch_size: most rows decoded together; later requests wait for a free row.
        max_model_len: most tokens (prompt + max_tokens) a request may use.
        prefill_chunk: most prompt tokens prefilled in one step, between two decode steps of the running rows:
            newcomers are admitted while their left-padded prompts fit it, and a longer prompt is prefilled
            alone, this many tokens per step (chunked prefill), so that it never stalls the running requests.

    Attributes:
        eos_ids: token ids that end a request with finish_reason "stop" (the generation config's and
            the tokenizer's EOS); set it to set() to always generate max_tokens (benchmarks).
    """

    def __init__(
        self, model: nn.Module, tokenizer, bank: AdapterBank, max_batch_size: int = 16, max_model_len: int = 2048,
        prefill_chunk: int = PREFILL_CHUNK,
    ) -> None:
        if bank.model is not model:
            raise ValueError("the bank must be built on the same model object: AdapterBank(model)")
        if max_batch_size < 1 or max_model_len < 2 or prefill_chunk < 1:
            raise ValueError("need max_batch_size >= 1, max_model_len >= 2 and prefill_chunk >= 1, found "
                             f"{max_batch_size}, {max_model_len}, {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        self.model, self.tokenizer, self.bank = model.eval(), tokenizer, bank
        self.max_batch_size, self.max_model_len = max_batch_size, max_model_len
        self.vocab_size = model.get_input_embeddings().weight.shape[0]
        self.eos_ids = _eos_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._waiting: deque[_Row] = deque()
        self._rows: list[_Row] = []
        self._cache: Cache | None = None
        self._mask: torch.Tensor | None = None
        self._chunked: _Chunked | None = None  # the long prompt being prefilled chunk by chunk
        self._wakeup = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._ids = itertools.count(1)
        self._stats = EngineStats()

    # ----------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Start the scheduler thread (idempotent)."""
        if self._thread is None or not self._thread.is_alive():
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="deltaw-engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        """Stop the scheduler; requests still waiting or running end with finish_reason "cancelled"."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify_all()
        if self._thread is not None:
            self._thread.join()
        for row in [*self._waiting, *self._rows, *([self._chunked.row] if self._chunked else [])]:
            self._finish(row, "cancelled", None)
        self._waiting.clear()
        self._rows, self._cache, self._mask, self._chunked = [], None, None, None

    def __enter__(self) -> Engine:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ----------------------------------------------------------------------------- requests
    def submit(self, prompt_ids: list[int], adapter: AdapterChoice, params: SamplingParams) -> RequestHandle:
        """Queue a request; raises UnknownAdapterError or ValueError (bad input) before queueing.

        The adapters' slots are acquired last and released if queueing fails, so a rejected request
        never holds a slot.
        """
        self._check_prompt(prompt_ids, params)
        handle = RequestHandle(f"req-{next(self._ids)}", len(prompt_ids))
        generator, stream = params.generator(), TextStream(self.tokenizer, list(params.stop))
        route = self.bank.acquire(adapter)
        try:
            self._enqueue(_Row(handle, route, params, generator, stream, list(prompt_ids)))
        except BaseException:
            self.bank.release(route)
            raise
        return handle

    def _enqueue(self, row: _Row) -> None:
        with self._wakeup:
            if self._stopping:
                raise RuntimeError("the engine is shut down")
            self._stats.submitted(len(row.prompt_ids))
            self._waiting.append(row)
            self._wakeup.notify_all()

    def _check_prompt(self, prompt_ids: list[int], params: SamplingParams) -> None:
        params.check()
        if not isinstance(prompt_ids, (list, tuple)):
            raise ValueError(f"the prompt must be a list of token ids, found {type(prompt_ids).__name__}")
        if not prompt_ids:
            raise ValueError("the prompt is empty: give at least one token")
        if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.vocab_size for i in prompt_ids):
            raise ValueError(f"prompt token ids must be integers in [0, {self.vocab_size})")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the model length "
                f"limit of {self.max_model_len} tokens; shorten the prompt or lower max_tokens"
            )

    def stats(self) -> dict:
        """Counters and latency summaries (seconds) for /metrics."""
        with self._wakeup:
            running = sum(not row.finished for row in self._rows) + (self._chunked is not None)  # ended, not dropped
            waiting = len(self._waiting)
        return {**self._stats.snapshot(), "requests_running": running, "requests_waiting": waiting,
                "adapters_resident": len(self.bank.resident())}

    # ----------------------------------------------------------------------------- scheduler
    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wakeup:
                    while not self._stopping and not self._waiting and not self._rows and self._chunked is None:
                        self._wakeup.wait()
                    if self._stopping:
                        return
                try:
                    self._step()
                except Exception as exc:  # noqa: BLE001 - fail the batch's requests, keep serving
                    self._fail_all(exc)

    def _step(self) -> None:
        """Prefill at most `prefill_chunk` prompt tokens (newcomers, or the next chunk of a long prompt), run one
        decode step for the running rows, drop finished rows."""
        self._drop_cancelled()
        if self._chunked is not None:
            self._prefill_chunk()
        else:
            newcomers = self._take_newcomers()
            if len(newcomers) == 1 and self._chunkable(newcomers[0]):
                self._chunked = _Chunked(newcomers[0], compat.new_cache(roomy=True))
                self._prefill_chunk()
            else:
                for group in prefill_groups(newcomers, self.vocab_size):
                    self._prefill(group)
        if self._rows:
            self._decode()

    def _take_newcomers(self) -> list[_Row]:
        """Waiting requests for free rows, as many as fit `prefill_chunk` tokens once left-padded (at least one)."""
        with self._wakeup:
            free = self.max_batch_size - len(self._rows)
            newcomers: list[_Row] = []
            longest = 0  # the longest prompt among the newcomers
            while self._waiting and len(newcomers) < free:
                widest = max(longest, len(self._waiting[0].prompt_ids))
                if newcomers and widest * (len(newcomers) + 1) > self.prefill_chunk:
                    break
                newcomers.append(self._waiting.popleft())
                longest = widest
        for row in newcomers:
            if row.handle.cancelled:
                self._finish(row, "cancelled", None)
        return [row for row in newcomers if not row.finished]

    def _chunkable(self, row: _Row) -> bool:
        """A prompt longer than `prefill_chunk` is prefilled alone, one chunk per step (unless it wants prompt
        logprobs, which need every position's logits at once)."""
        return len(row.prompt_ids) > self.prefill_chunk and row.params.prompt_logprobs is None

    def _prefill_chunk(self) -> None:
        """Run the next `prefill_chunk` tokens of the long prompt being prefilled (alone: no padding); after its
        last chunk, sample its first token and join the batch. A cancelled or failing prompt ends alone."""
        chunked, self._chunked = self._chunked, None
        row, done = chunked.row, chunked.done
        if row.handle.cancelled:
            self._finish(row, "cancelled", None)
            return
        end = min(done + self.prefill_chunk, len(row.prompt_ids))
        input_ids = torch.tensor([row.prompt_ids[done:end]], dtype=torch.long)
        mask = torch.ones(1, end, dtype=torch.long)
        positions = torch.arange(done, end, dtype=torch.long)[None]
        try:
            logits = self._forward([row], input_ids, mask, positions, chunked.cache)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory for one long prompt
            self._finish(row, "error", exc)
            return
        if end < len(row.prompt_ids):
            self._chunked = _Chunked(row, chunked.cache, end)
        else:
            self._admit([row], chunked.cache, mask, logits, echo=False)

    def _prefill(self, newcomers: list[_Row]) -> None:
        """Run the newcomers' prompts (left-padded together), sample their first tokens, join the batch.
        If the forward fails, only the newcomers end (finish_reason "error"); the batch runs on."""
        input_ids, mask, positions = prompt_batch([row.prompt_ids for row in newcomers], self.pad_id)
        cache = compat.new_cache(roomy=True)
        echo = any(row.params.prompt_logprobs is not None for row in newcomers)
        try:
            logits = self._forward(newcomers, input_ids, mask, positions, cache, input_ids.shape[1] if echo else 1)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory for one long prompt
            for row in newcomers:
                self._finish(row, "error", exc)
            return
        self._admit(newcomers, cache, mask, logits, echo)

    def _admit(self, newcomers: list[_Row], cache: Cache, mask: torch.Tensor, logits: torch.Tensor,
               echo: bool) -> None:
        """Join prefilled rows (their cache, mask [rows, columns], logits [rows, kept, vocab]) to the batch and
        sample their first tokens."""
        for row in newcomers:
            row.length = len(row.prompt_ids)
        with self._wakeup:
            self._cache, self._mask = join(self._cache, self._mask, cache, mask)
            self._rows += newcomers
        if echo:
            self._record_prompt_logprobs(newcomers, logits)
        self._sample(newcomers, logits[:, -1], first=True)
        self._drop_finished()

    def _record_prompt_logprobs(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Give each row that asked for them its prompt's logprobs; logits: [rows, columns, vocab], left-padded.
        A row whose logprobs fail ends alone with finish_reason "error"; the other rows go on."""
        for index, row in enumerate(rows):
            if row.params.prompt_logprobs is None:
                continue
            try:
                prompt = row.prompt_ids
                row.handle.prompt_logprobs = prompt_logprobs(logits[index, -len(prompt):], prompt,
                                                             row.params.prompt_logprobs)
            except Exception as exc:  # noqa: BLE001 - this row's request is bad; the batch runs on
                self._finish(row, "error", exc)

    def _decode(self) -> None:
        rows = self._rows
        input_ids = torch.tensor([[row.last_token] for row in rows], dtype=torch.long)
        positions = torch.tensor([[row.length] for row in rows], dtype=torch.long)
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(rows), 1)], dim=1)
        logits = self._forward(rows, input_ids, self._mask, positions, self._cache)[:, -1]
        for row in rows:
            row.length += 1
        self._sample(rows, logits, first=False)
        self._drop_finished()

    def _forward(self, rows: list[_Row], input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 cache: Cache, keep: int = 1) -> torch.Tensor:
        """The last `keep` positions' logits [rows, keep, vocab], each row routed to its adapters; the cache grows."""
        device = self.model.get_input_embeddings().weight.device
        with self.bank.forward_lock:
            self.bank.set_routing([row.route for row in rows])
            output = self.model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                position_ids=positions.to(device), **compat.cache_argument(self.model, cache),
                                use_cache=True, logits_to_keep=keep)
        return output.logits[:, -keep:, :].float().cpu()

    def _sample(self, rows: list[_Row], logits: torch.Tensor, first: bool) -> None:
        """Each row's next token from `logits` [rows, vocab]. A row whose logits are not finite, or whose
        sampling fails, ends alone with finish_reason "error"; the other rows go on."""
        greedy = logits.argmax(dim=-1).tolist()
        finite = torch.isfinite(logits.sum(dim=-1)).tolist()  # NaN or ±inf anywhere makes the sum NaN or ±inf
        for index, row in enumerate(rows):
            if row.finished:  # failed earlier in this step (its prompt logprobs)
                continue
            try:
                if not finite[index]:
                    raise ValueError("the model computed non-finite logits (NaN or infinity) for this request; "
                                     "its adapter, or the weights of its mix, are out of range")
                token = greedy[index] if row.params.greedy else sample_token(logits[index], row.params,
                                                                             row.generator)
                row.last_token = token
                if first:
                    self._stats.first_token(time.perf_counter() - row.handle.submitted)
                self._advance(row, token, _token_logprob(row, logits[index], token))
            except Exception as exc:  # noqa: BLE001 - this row's input is bad; the batch runs on
                self._finish(row, "error", exc)

    def _advance(self, row: _Row, token: int, logprob: TokenLogprob | None = None) -> None:
        """Emit `token`'s event: its new text, and the finish reason if it ends the request."""
        if token in self.eos_ids and not row.params.ignore_eos:
            text, reason = row.stream.flush(), "stop"
        else:
            text = row.stream.push(token)
            reason = "stop" if row.stream.stopped else None
            if reason is None and row.handle.completion_tokens + 1 >= row.params.max_tokens:
                text, reason = text + row.stream.flush(), "length"
        event = TokenEvent(text, token, reason, logprob)
        if reason is None:
            row.handle._emit(event)
        else:
            self._close(row, event)

    def _finish(self, row: _Row, reason: str, error: BaseException | None) -> None:
        """End `row`'s request without a token (cancelled, failed, shut down)."""
        if row.finished:
            return
        row.handle.error = error
        self._close(row, TokenEvent(row.stream.flush() if error is None else "", None, reason))

    def _close(self, row: _Row, last: TokenEvent) -> None:
        """Release the row's adapter slots, then emit its last event: a client holding its answer finds them free."""
        row.finished = True
        self.bank.release(row.route)
        row.handle._emit(last)
        self._stats.finished(row.handle)

    def _drop_cancelled(self) -> None:
        """End cancelled requests, running or still waiting."""
        with self._wakeup:
            waiting = [row for row in self._waiting if row.handle.cancelled]
            for row in waiting:
                self._waiting.remove(row)
        for row in [*waiting, *self._rows]:
            if row.handle.cancelled:
                self._finish(row, "cancelled", None)
        self._drop_finished()

    def _drop_finished(self) -> None:
        """Remove finished rows from the batch and its cache."""
        keep = [index for index, row in enumerate(self._rows) if not row.finished]
        if len(keep) == len(self._rows):
            return
        with self._wakeup:
            if keep:
                self._cache, self._mask = keep_rows(self._cache, self._mask, keep)
            else:
                self._cache = self._mask = None
            self._rows = [self._rows[index] for index in keep]

    def _fail_all(self, error: Exception) -> None:
        """The forward failed: end every running request with finish_reason "error" and start afresh."""
        for row in [*self._rows, *([self._chunked.row] if self._chunked else [])]:
            self._finish(row, "error", error)
        with self._wakeup:
            self._rows, self._cache, self._mask, self._chunked = [], None, None, None


def prefill_groups(rows: list[_Row], vocab_size: int) -> list[list[_Row]]:
    """Newcomers in prefill groups: rows without prompt logprobs all together; rows with them in groups whose
    [rows, longest prompt, vocab] float32 logits fit in PROMPT_LOGITS_BYTES (a group has at least one row)."""
    plain = [row for row in rows if row.params.prompt_logprobs is None]
    groups, group, longest = ([plain] if plain else []), [], 0
    for row in rows:
        if row.params.prompt_logprobs is None:
            continue
        widest = max(longest, len(row.prompt_ids))
        if group and (len(group) + 1) * widest * vocab_size * 4 > PROMPT_LOGITS_BYTES:
            groups.append(group)
            group, widest = [], len(row.prompt_ids)
        group.append(row)
        longest = widest
    return groups + ([group] if group else [])


def _token_logprob(row: _Row, logits: torch.Tensor, token: int) -> TokenLogprob | None:
    """`token`'s logprob and the row's top alternatives from its own logits [vocab], if the request asked."""
    if row.params.logprobs is None:
        return None
    return token_logprobs(logits[None], [token], [row.params.logprobs])[0]


def _eos_ids(model: nn.Module, tokenizer) -> set[int]:
    """Token ids that end generation: the generation config's eos_token_id(s) and the tokenizer's."""
    ids: set[int] = set()
    config = getattr(model, "generation_config", None)
    for value in (getattr(config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(int(v) for v in value)
    return ids


def parse_adapter_choice(text: str, base_name: str) -> AdapterChoice:
    """A request's `model` field as an adapter choice.

    "pirate" -> "pirate"; `base_name` -> None; "pirate*0.5+robot*0.5" -> {"pirate": 0.5, "robot": 0.5}
    ("robot" alone in a mix means weight 1). A plain name is returned as is (the bank decides whether
    it exists); a malformed mix, or a weight outside [-MAX_MIX_WEIGHT, MAX_MIX_WEIGHT], is a ValueError.
    """
    text = text.strip()
    if text == base_name:
        return None
    if "*" not in text and "+" not in text:
        return text
    mix: dict[str, float] = {}
    for part in text.split("+"):
        name, _, weight = (piece.strip() for piece in part.partition("*"))
        if name == base_name:
            raise ValueError(f"{text!r}: the base model {base_name!r} cannot be part of a mix (it adds no delta)")
        check_adapter_name(name)
        if name in mix:
            raise ValueError(f"{text!r}: adapter {name!r} appears twice in the mix")
        mix[name] = _mix_weight(text, weight) if "*" in part else 1.0
    return mix


def _mix_weight(text: str, weight: str) -> float:
    try:
        value = float(weight)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value):
        raise ValueError(f"{text!r}: weight {weight!r} is not a finite number; write a mix like 'pirate*0.5+robot*0.5'")
    if abs(value) > MAX_MIX_WEIGHT:
        raise ValueError(f"{text!r}: weight {weight!r} is outside [-{MAX_MIX_WEIGHT:g}, {MAX_MIX_WEIGHT:g}]; "
                         "a larger weight drowns the base model's output (or overflows it)")
    return value
