"""The server's Prometheus metrics (GET /metrics), on prometheus_client's own registry and text format.

Names follow Prometheus' conventions (units in the name, _total for counters); the load gauges (requests
waiting and running in each worker's scheduler, KV pages in use) are read from the workers at scrape time."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

CONTENT_TYPE = CONTENT_TYPE_LATEST  # the /metrics response's media type
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


class Metrics:
    def __init__(self) -> None:
        disable_created_metrics()  # no *_created series: they double the output and no dashboard reads them
        r = self.registry = CollectorRegistry()
        self.requests = Counter("corejax_requests", "HTTP requests answered, by endpoint and status code.",
                                ["model", "endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("corejax_prompt_tokens", "Prompt tokens processed.", ["model"], registry=r)
        self.generation_tokens = Counter("corejax_generation_tokens", "Tokens generated.", ["model"], registry=r)
        self.in_flight = Gauge("corejax_requests_in_flight", "Requests this server is answering now.", ["model"],
                               registry=r)
        self.waiting = Gauge("corejax_requests_waiting", "Requests queued in the worker's scheduler.", ["model"],
                             registry=r)
        self.running = Gauge("corejax_requests_running", "Requests prefilling or decoding in the worker.",
                             ["model"], registry=r)
        self.kv_usage = Gauge("corejax_kv_cache_usage_ratio", "Fraction of the KV page pool held by requests.",
                              ["model"], registry=r)
        self.ttft = Histogram("corejax_time_to_first_token_seconds", "Time from the request to its first token.",
                              ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.duration = Histogram("corejax_request_duration_seconds", "Time from the request to its last byte.",
                                  ["model", "endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.decode_rate = Histogram("corejax_decode_tokens_per_second", "Decode speed of each generation "
                                     "(tokens after the first over the time after the first).", ["model"],
                                     buckets=_RATE_BUCKETS, registry=r)

    def observe_load(self, model: str, info: dict) -> None:
        """Load gauges from a worker's info() (generative models only)."""
        if "kv_pages_total" not in info:
            return
        self.waiting.labels(model).set(info["requests_waiting"])
        self.running.labels(model).set(info["requests_running"])
        self.kv_usage.labels(model).set(info["kv_pages_in_use"] / max(info["kv_pages_total"], 1))

    def text(self) -> bytes:
        return generate_latest(self.registry)
