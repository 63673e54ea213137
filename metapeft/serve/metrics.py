"""The server's Prometheus metrics, in a registry of their own.

``adapter`` labels name the adapter a request used, empty for the base model.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

__all__ = ["ServerMetrics"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServerMetrics:
    """Counters, histograms and gauges of one server, rendered by :meth:`render`.

    Example:
        >>> metrics = ServerMetrics()
        >>> metrics.requests.labels(adapter="", status="stop").inc()
        >>> body, content_type = metrics.render()
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "metapeft_requests",
            "Generation requests by how they ended: stop, length, cancelled (the client "
            "went away) or error.",
            ["adapter", "status"],
            registry=r,
        )
        self.rejected = Counter(
            "metapeft_rejected_requests",
            "API requests refused before generation, by HTTP status code.",
            ["code"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "metapeft_prompt_tokens", "Prompt tokens processed.", ["adapter"], registry=r
        )
        self.generation_tokens = Counter(
            "metapeft_generation_tokens", "Tokens generated.", ["adapter"], registry=r
        )
        self.time_to_first_token = Histogram(
            "metapeft_time_to_first_token_seconds",
            "From a request's arrival to its first generated token.",
            ["adapter"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "metapeft_inter_token_latency_seconds",
            "Between two consecutive tokens of one request.",
            ["adapter"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.decode_batch_size = Histogram(
            "metapeft_decode_batch_size",
            "Requests decoded together in one step.",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.running = Gauge(
            "metapeft_running_requests", "Requests in the running batch.", registry=r
        )
        self.waiting = Gauge(
            "metapeft_waiting_requests", "Requests queued for a place in the batch.", registry=r
        )
        self.kv_cache_bytes = Gauge(
            "metapeft_kv_cache_bytes", "Bytes held by the running batch's KV cache.", registry=r
        )
        self.adapters_loaded = Gauge(
            "metapeft_adapters_loaded", "Adapters loaded and servable.", registry=r
        )

    def render(self) -> tuple[bytes, str]:
        """The metrics in Prometheus' text format, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
