"""Prometheus metrics, kept in a registry per app so that several apps (tests, workers) never collide."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.queue_depth = Gauge(
            "medmo_queue_depth",
            "Requests admitted and not yet running (being read, decoded or waiting for a batch).",
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "medmo_batch_size",
            "Requests per generate() call.",
            buckets=(1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128),
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "medmo_queue_wait_seconds",
            "Time from entering the batch queue to the batch starting.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inference_time = Histogram(
            "medmo_batch_inference_seconds",
            "Duration of one generate() call.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.requests = Counter(
            "medmo_requests",
            "Finished task requests by task and HTTP status.",
            ["task", "status"],
            registry=self.registry,
        )
        self.generated_tokens = Counter(
            "medmo_generated_tokens",
            "Tokens generated, by task.",
            ["task"],
            registry=self.registry,
        )
        self.rejections = Counter(
            "medmo_rejections",
            "Requests refused before running, by reason (queue_full, deadline, draining, dead, ...).",
            ["reason"],
            registry=self.registry,
        )
