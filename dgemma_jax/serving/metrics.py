"""Prometheus metrics of one server (its own registry, so several servers can live in one process)."""

from __future__ import annotations

import collections
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120)


class Metrics:
    """Requests by endpoint and status, queue depth, slots in use, generated tokens and tokens/s
    (over the last ``window`` seconds), steps per canvas, tokens per forward pass, time to first
    token, per-canvas latency and time spent queued."""

    def __init__(self, engine, window: float = 10.0):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("dgemma_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.finished = Counter("dgemma_generations_finished", "generations by finish reason", ["reason"], registry=r)
        self.tokens = Counter("dgemma_generated_tokens", "tokens generated", registry=r)
        queue = Gauge("dgemma_queue_depth", "requests waiting for a batch slot", registry=r)
        queue.set_function(lambda: engine.queue_depth)
        slots = Gauge("dgemma_active_slots", "batch slots in use", registry=r)
        slots.set_function(lambda: engine.active)
        rate = Gauge("dgemma_tokens_per_second", f"tokens generated per second over the last {window:g} s",
                     registry=r)
        rate.set_function(self._tokens_per_second)
        self.steps = Histogram("dgemma_steps_per_canvas", "denoising steps a canvas took",
                               buckets=(1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128), registry=r)
        self.tokens_per_forward = Histogram("dgemma_tokens_per_forward", "tokens per decoder pass, per generation",
                                            buckets=(0.5, 1, 2, 4, 8, 12, 16, 24, 32, 64, 128, 256), registry=r)
        self.ttft = Histogram("dgemma_time_to_first_token_seconds", "request arrival to its first canvas",
                              buckets=_LATENCY, registry=r)
        self.canvas = Histogram("dgemma_canvas_seconds", "latency of one canvas step of the batch", buckets=_LATENCY,
                                registry=r)
        self.queued = Histogram("dgemma_queue_seconds", "time a request waited for a slot", buckets=_LATENCY,
                                registry=r)
        self._window = window
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()
        engine.stats.listeners.append(self._on_engine)

    def _on_engine(self, name: str, value: float) -> None:
        if name == "tokens":
            self.tokens.inc(value)
            with self._lock:
                self._recent.append((time.monotonic(), int(value)))
        elif name == "canvas_seconds":
            self.canvas.observe(value)
        elif name == "steps_per_canvas":
            self.steps.observe(value)
        elif name == "queue_seconds":
            self.queued.observe(value)
        elif name.startswith("finished:"):
            self.finished.labels(name.split(":", 1)[1]).inc(value)

    def _tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - self._window:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / self._window

    def text(self) -> bytes:
        return generate_latest(self.registry)
