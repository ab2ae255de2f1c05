"""A request in flight: the handle a caller streams events from, and the engine's statistics.

`RequestHandle` is filled by the engine's scheduler thread and read from any other thread: events go
through a queue, so a caller may iterate (blocking) or poll `next_event(timeout)` from asyncio via
`asyncio.to_thread`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from deltaw.serve.logprobs import TokenLogprob


@dataclass
class TokenEvent:
    """One step of a request's output.

    Attributes:
        text: text released since the previous event (may be "": held back or a special token).
        token_id: the token generated at this step (None for an event without a token, e.g. cancel).
        finish_reason: None while running; at the end "stop" (EOS or a stop string), "length"
            (max_tokens), "cancelled", or "error" (the engine failed; `RequestHandle.error` says why).
        logprob: the token's log-probability and top alternatives, when the request asked for logprobs.
    """

    text: str
    token_id: int | None
    finish_reason: str | None
    logprob: TokenLogprob | None = None


@dataclass
class Completion:
    """A finished request: the whole text (stop string excluded), token counts, and the logprobs asked for
    (`logprobs`: one per generated token; `prompt_logprobs`: one per prompt token, the first None)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None


class RequestHandle:
    """A submitted request: stream its events, or wait for its result, from any thread."""

    def __init__(self, request_id: str, prompt_tokens: int) -> None:
        self.request_id, self.prompt_tokens = request_id, prompt_tokens
        self.completion_tokens = 0
        self.error: BaseException | None = None
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        self.prompt_logprobs: list[TokenLogprob | None] | None = None  # set before the first event
        self._events: queue.Queue[TokenEvent] = queue.Queue()
        self._pieces: list[str] = []
        self._logprobs: list[TokenLogprob] = []
        self._final: TokenEvent | None = None
        self._done = threading.Event()
        self._cancelled = threading.Event()
        self._waker: Callable[[], None] | None = None  # set while an event loop awaits the next event

    def __iter__(self) -> Iterator[TokenEvent]:
        """Events until (and including) the finishing one."""
        while True:
            event = self.next_event()
            yield event
            if event.finish_reason is not None:
                return

    def next_event(self, timeout: float | None = None) -> TokenEvent:
        """The next event (blocking; TimeoutError after `timeout` s). After the end, the final event again."""
        if self._final is not None and self._events.empty():
            return self._final
        try:
            return self._events.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"request {self.request_id}: no event within {timeout} s") from None

    async def next_event_async(self) -> TokenEvent:
        """The next event, awaited on the running event loop: the engine thread wakes the loop when it emits
        one (no worker thread per waiting request). After the end, the final event again."""
        loop = asyncio.get_running_loop()
        while True:
            if self._final is not None and self._events.empty():
                return self._final
            with contextlib.suppress(queue.Empty):
                return self._events.get_nowait()
            arrived = loop.create_future()
            self._waker = functools.partial(_wake, loop, arrived)
            if not self._events.empty() or self._final is not None:  # emitted before the waker was set
                self._waker = None
                continue
            await arrived

    def result(self) -> Completion:
        """Wait for the end; RuntimeError if the engine failed while running this request."""
        self._done.wait()
        if self.error is not None:
            raise RuntimeError(f"request {self.request_id} failed: {self.error}") from self.error
        return Completion("".join(self._pieces), self.prompt_tokens, self.completion_tokens,
                          self._final.finish_reason, list(self._logprobs), self.prompt_logprobs)

    def cancel(self) -> None:
        """Stop generating; the request leaves the batch at the next step (finish_reason "cancelled")."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def _emit(self, event: TokenEvent) -> None:
        if self._final is not None:
            return
        if event.text:
            self._pieces.append(event.text)
        if event.logprob is not None:
            self._logprobs.append(event.logprob)
        if event.token_id is not None:
            self.completion_tokens += 1
            self.first_token_at = self.first_token_at or time.perf_counter()
        if event.finish_reason is not None:
            self._final = event
        self._events.put(event)
        if event.finish_reason is not None:
            self._done.set()
        waker, self._waker = self._waker, None
        if waker is not None:
            waker()


def _wake(loop: asyncio.AbstractEventLoop, arrived: asyncio.Future) -> None:
    """From the engine thread: resolve `arrived` on its loop (a no-op if it was cancelled or the loop closed)."""
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
        loop.call_soon_threadsafe(lambda: arrived.done() or arrived.set_result(None))


class EngineStats:
    """Thread-safe counters and recent latency samples."""

    def __init__(self, window: int = 1024) -> None:
        self._lock = threading.Lock()
        self.counts = {"requests_total": 0, "requests_finished": 0, "prompt_tokens_total": 0,
                       "completion_tokens_total": 0}
        self.ttft: deque[float] = deque(maxlen=window)
        self.latency: deque[float] = deque(maxlen=window)

    def submitted(self, prompt_tokens: int) -> None:
        with self._lock:
            self.counts["requests_total"] += 1
            self.counts["prompt_tokens_total"] += prompt_tokens

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft.append(seconds)

    def finished(self, handle: RequestHandle) -> None:
        with self._lock:
            self.counts["requests_finished"] += 1
            self.counts["completion_tokens_total"] += handle.completion_tokens
            self.latency.append(time.perf_counter() - handle.submitted)

    def snapshot(self) -> dict:
        """Counters, plus {"count", "sum", "p50", "p90", "p99"} for time to first token and request latency."""
        with self._lock:
            return {**self.counts, "time_to_first_token_seconds": summarize(list(self.ttft)),
                    "request_latency_seconds": summarize(list(self.latency))}


def summarize(samples: list[float]) -> dict[str, float]:
    """count, sum and the 50th/90th/99th percentiles (nearest rank) of `samples`."""
    ordered = sorted(samples)
    summary = {"count": len(ordered), "sum": sum(ordered)}
    for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
        summary[name] = ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0
    return summary
