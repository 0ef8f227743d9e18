"""Prometheus metrics for the miner and the server: one registry per ``Metrics`` object, served on request.

Nothing is exported unless ``start_http`` is called, so tests and embedders never open a port by accident.
Label values stay from small fixed sets (outcomes, caller classes, reasons, error kinds) to bound cardinality.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# TTFT spans a cached tiny model (~ms) up to a large model behind an upstream hop under load (seconds).
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Gaps between chunks are bounded by the flush interval (50 ms by default) unless the model stalls.
_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 5.0)


class _StatsSource(Protocol):
    def stats(self) -> Any: ...


class Metrics:
    """The collectors the miner and the server update; see the method docs for who calls what."""

    def __init__(self, registry: CollectorRegistry | None = None, namespace: str = "minercore") -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._http: Any = None
        self._http_thread: threading.Thread | None = None
        self.requests = Counter(
            "requests", "Finished requests by outcome (a finish reason or an error kind) and caller class",
            ["outcome", "caller_class"], namespace=namespace, registry=self.registry)
        self.tokens = Counter("tokens", "Generated tokens streamed to callers", ["caller_class"],
                              namespace=namespace, registry=self.registry)
        self.ttft = Histogram("ttft_seconds", "Time from request arrival to its first text", ["caller_class"],
                              namespace=namespace, registry=self.registry, buckets=_TTFT_BUCKETS)
        self.chunk_gap = Histogram("chunk_gap_seconds", "Time between consecutive text chunks of one stream",
                                   namespace=namespace, registry=self.registry, buckets=_GAP_BUCKETS)
        self.blacklist = Counter("blacklist_rejections", "Requests refused before generation, by reason",
                                 ["reason"], namespace=namespace, registry=self.registry)
        self.upstream_errors = Counter("upstream_errors", "Failed calls to the upstream server, by kind",
                                       ["kind"], namespace=namespace, registry=self.registry)
        self.active = Gauge("active_streams", "Requests generating now", namespace=namespace,
                            registry=self.registry)
        self.queued = Gauge("queued_streams", "Requests waiting for a slot", namespace=namespace,
                            registry=self.registry)
        self.tokens_per_s = Gauge("backend_tokens_per_second", "Backend decode rate over its recent window",
                                  namespace=namespace, registry=self.registry)
        self.acceptance = Gauge("speculative_acceptance", "Share of speculative draft ids the model accepted",
                                namespace=namespace, registry=self.registry)
        self.tokens_per_step = Gauge("speculative_tokens_per_step", "Tokens each verify forward emitted, on average",
                                     namespace=namespace, registry=self.registry)
        # The paged KV cache (0 with the static one): EngineStats field -> its gauge.
        self.kv = {field: Gauge(field, text, namespace=namespace, registry=self.registry)
                   for field, text in _KV_GAUGES.items()}

    def observe_request(self, outcome: str, caller_class: str, ttft_s: float | None = None,
                        chunk_gaps: Iterable[float] = (), tokens: int = 0) -> None:
        """One finished request: the miner per synapse, the server per HTTP request (caller class "http")."""
        self.requests.labels(outcome=outcome, caller_class=caller_class).inc()
        if tokens > 0:
            self.tokens.labels(caller_class=caller_class).inc(tokens)
        if ttft_s is not None:
            self.ttft.labels(caller_class=caller_class).observe(ttft_s)
        for gap in chunk_gaps:
            self.chunk_gap.observe(gap)

    def blacklist_rejected(self, reason: str) -> None:
        self.blacklist.labels(reason=reason).inc()

    def upstream_error(self, kind: str) -> None:
        """Called by ``UpstreamBackend`` for every failed attempt (connect, http_4xx, http_5xx, protocol...)."""
        self.upstream_errors.labels(kind=kind).inc()

    def sample(self, backend: _StatsSource) -> None:
        """Copy the backend's load into the gauges now (for callers that sample on their own schedule)."""
        stats = backend.stats()
        self.active.set(stats.active)
        self.queued.set(stats.queued)
        self.tokens_per_s.set(stats.tokens_per_s)
        self.acceptance.set(acceptance(stats))
        self.tokens_per_step.set(tokens_per_step(stats))
        for field, gauge in self.kv.items():
            gauge.set(getattr(stats, field, 0))

    def bind(self, backend: _StatsSource) -> None:
        """Make the gauges read ``backend.stats()`` at every scrape, so they are never stale.

        Scrapes run on the exporter's thread; both backends' ``stats()`` are safe to call from there.
        """
        self.active.set_function(lambda: backend.stats().active)
        self.queued.set_function(lambda: backend.stats().queued)
        self.tokens_per_s.set_function(lambda: backend.stats().tokens_per_s)
        self.acceptance.set_function(lambda: acceptance(backend.stats()))
        self.tokens_per_step.set_function(lambda: tokens_per_step(backend.stats()))
        for field, gauge in self.kv.items():
            gauge.set_function(lambda field=field: getattr(backend.stats(), field, 0))

    def start_http(self, port: int, addr: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` on a daemon thread; returns the bound port (``port=0`` picks a free one)."""
        if self._http is not None:
            raise RuntimeError("the metrics endpoint is already running")
        self._http, self._http_thread = start_http_server(port, addr=addr, registry=self.registry)
        return int(self._http.server_port)

    def stop_http(self) -> None:
        if self._http is None:
            return
        self._http.shutdown()
        self._http.server_close()
        if self._http_thread is not None:
            self._http_thread.join(timeout=5)
        self._http = self._http_thread = None


_KV_GAUGES = {
    "kv_blocks_used": "Paged KV blocks held by requests now",
    "kv_blocks_free": "Paged KV blocks a request can take now (cached ones with no holder included)",
    "kv_blocks_cached": "Paged KV blocks holding a cached prompt prefix that no request holds",
    "prefix_hit_blocks": "Prompt blocks found in the prefix cache instead of computed, since start",
    "prefix_miss_blocks": "Full prompt blocks computed because the prefix cache did not hold them, since start",
    "prefix_partial_hits": "Prompt blocks whose leading tokens were copied from a cached block, since start",
    "kv_evictions": "Cached prefix blocks evicted to make room, since start",
    "kv_preemptions": "Decoding streams whose KV blocks were freed for others (recomputed later), since start",
}


def acceptance(stats: Any) -> float:
    """Accepted draft ids over draft ids checked (0 before any draft, and for backends that do not draft)."""
    drafted = getattr(stats, "draft_tokens", 0)
    return stats.accepted_tokens / drafted if drafted else 0.0


def tokens_per_step(stats: Any) -> float:
    """Tokens per verify forward: its accepted drafts and the model's own id (1 to k + 1; 0 before any)."""
    steps = getattr(stats, "verify_steps", 0)
    return (stats.accepted_tokens + steps) / steps if steps else 0.0
