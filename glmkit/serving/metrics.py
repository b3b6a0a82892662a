"""`GET /metrics` in Prometheus' text format (prometheus_client), one registry per served model.

glmkit_queue_depth (requests waiting), glmkit_running_rows (rows being prefilled or decoded), glmkit_kv_blocks_used /
glmkit_kv_blocks_free (the paged KV cache), glmkit_generated_tokens_total, glmkit_tokens_per_second (generated over
the last WINDOW_S seconds), glmkit_requests_total{finish="stop|length|cancelled|timeout|error"} and glmkit_time_to_first_token_seconds (a
histogram, from the request reaching the engine to its first token).
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = CONTENT_TYPE_LATEST  # the exposition format's media type
WINDOW_S = 10.0
RETRY_AFTER_S = 1  # what a 503 asks the client to wait
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    """The metrics of one ChatService; `render()` gives the exposition text."""

    def __init__(self, engine: Any) -> None:
        self.registry = registry = CollectorRegistry()
        Gauge("glmkit_queue_depth", "Requests waiting for a decoding row", registry=registry).set_function(
            engine.queued)
        Gauge("glmkit_running_rows", "Requests being prefilled or decoded", registry=registry).set_function(
            lambda: engine.active)
        Gauge("glmkit_kv_blocks_used", "KV cache blocks held by requests", registry=registry).set_function(
            lambda: engine.kv_blocks()[0])
        Gauge("glmkit_kv_blocks_free", "KV cache blocks free", registry=registry).set_function(
            lambda: engine.kv_blocks()[1])
        self._tokens = Counter("glmkit_generated_tokens", "Tokens generated", registry=registry)
        Gauge("glmkit_tokens_per_second", f"Tokens generated per second over the last {WINDOW_S:g} s",
              registry=registry).set_function(self.tokens_per_second)
        self._requests = Counter("glmkit_requests", "Requests finished, by how they ended", ["finish"],
                                 registry=registry)
        self._ttft = Histogram("glmkit_time_to_first_token_seconds", "Seconds from a request reaching the engine "
                               "to its first token", buckets=TTFT_BUCKETS, registry=registry)
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()

    def tokens(self, n: int) -> None:
        self._tokens.inc(n)
        now = time.monotonic()
        with self._lock:
            self._recent.append((now, n))
            self._trim(now)

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - WINDOW_S:
            self._recent.popleft()

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            return sum(n for _, n in self._recent) / WINDOW_S

    def first_token(self, seconds: float) -> None:
        self._ttft.observe(seconds)

    def finished(self, reason: str) -> None:
        self._requests.labels(finish=reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
