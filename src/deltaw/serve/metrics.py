"""Server metrics in the Prometheus text exposition format (version 0.0.4), written by hand.

Counters and histograms are updated from the event loop and read by `GET /metrics`; a lock keeps a
scrape from seeing a half-recorded request. Gauges (running/waiting requests, resident adapters)
are read from the engine and the bank at scrape time.
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
FIRST_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Histogram:
    """Cumulative-bucket histogram of seconds, as Prometheus expects it."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last slot is +Inf
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, seconds)] += 1
        self.total += seconds

    def lines(self, name: str) -> list[str]:
        out, cumulative = [], 0
        for bound, count in zip((*map(str, self.buckets), "+Inf"), self.counts):
            cumulative += count
            out.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
        return out + [f"{name}_sum {self.total:.6f}", f"{name}_count {cumulative}"]


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class ServerMetrics:
    """Requests, tokens and errors per served model, request latency and time to first token."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = defaultdict(int)  # (model, endpoint) -> finished requests
        self.prompt_tokens: dict[str, int] = defaultdict(int)
        self.completion_tokens: dict[str, int] = defaultdict(int)
        self.errors: dict[int, int] = defaultdict(int)  # HTTP status -> count
        self.latency = Histogram(LATENCY_BUCKETS)
        self.first_token = Histogram(FIRST_TOKEN_BUCKETS)

    def record_request(self, model: str, endpoint: str, prompt_tokens: int, completion_tokens: int,
                       latency: float, first_token: float | None) -> None:
        """Count one finished generation. `model`: the adapter name, the base name, or "mix"."""
        with self.lock:
            self.requests[(model, endpoint)] += 1
            self.prompt_tokens[model] += prompt_tokens
            self.completion_tokens[model] += completion_tokens
            self.latency.observe(latency)
            if first_token is not None:
                self.first_token.observe(first_token)

    def record_error(self, status: int) -> None:
        with self.lock:
            self.errors[status] += 1

    def render(self, gauges: dict[str, tuple[str, int | float]]) -> str:
        """The exposition text; `gauges` maps a metric name to (help, value), read by the caller now."""
        with self.lock:
            requests = sorted(self.requests.items())
            lines = _family("deltaw_requests_total", "counter", "Finished generation requests.",
                            [f'{{model="{_label(m)}",endpoint="{e}"}} {n}' for (m, e), n in requests])
            lines += _family("deltaw_prompt_tokens_total", "counter", "Prompt tokens of finished requests.",
                             [f'{{model="{_label(m)}"}} {n}' for m, n in sorted(self.prompt_tokens.items())])
            lines += _family("deltaw_completion_tokens_total", "counter", "Generated tokens of finished requests.",
                             [f'{{model="{_label(m)}"}} {n}' for m, n in sorted(self.completion_tokens.items())])
            lines += _family("deltaw_request_errors_total", "counter", "Requests answered with an error, by status.",
                             [f'{{status="{s}"}} {n}' for s, n in sorted(self.errors.items())])
            lines += ["# HELP deltaw_request_latency_seconds Time from request to last token.",
                      "# TYPE deltaw_request_latency_seconds histogram", *self.latency.lines(
                          "deltaw_request_latency_seconds")]
            lines += ["# HELP deltaw_time_to_first_token_seconds Time from request to first generated token.",
                      "# TYPE deltaw_time_to_first_token_seconds histogram", *self.first_token.lines(
                          "deltaw_time_to_first_token_seconds")]
        for name, (help_text, value) in gauges.items():
            lines += _family(name, "gauge", help_text, [f" {value}"])
        return "\n".join(lines) + "\n"


def _family(name: str, kind: str, help_text: str, samples: list[str]) -> list[str]:
    """HELP and TYPE lines, then one line per sample (`samples` hold the labels and the value)."""
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *(f"{name}{sample}" for sample in samples)]
