"""Prometheus metrics, kept in a registry per app so that several apps (tests, workers) never collide."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1, 2.5)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.queue_depth = Gauge(
            "medmo_queue_depth",
            "Requests waiting for the model: their upload has arrived, they are being decoded and prepared or "
            "wait for the engine to start on them.",
            registry=self.registry,
        )
        self.uploads_in_progress = Gauge(
            "medmo_uploads_in_progress",
            "Requests whose body is still arriving (they hold no place in the queue).",
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
        # --- the continuous engine ---
        self.running_requests = Gauge(
            "medmo_running_requests",
            "Requests the model is working on (holding a slot).",
            registry=self.registry,
        )
        self.waiting_requests = Gauge(
            "medmo_waiting_requests",
            "Requests prepared and waiting for a slot.",
            registry=self.registry,
        )
        self.waiting_by_priority = Gauge(
            "medmo_waiting_by_priority",
            "Requests in the engine and not yet started, by priority (stat, urgent, routine).",
            ["priority"],
            registry=self.registry,
        )
        self.latency_by_priority = Histogram(
            "medmo_engine_latency_by_priority_seconds",
            "From a prepared request entering the engine to its last token, by priority.",
            ["priority"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.slot_occupancy = Gauge(
            "medmo_slot_occupancy",
            "Fraction of the KV cache slots in use.",
            registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            "medmo_time_to_first_token_seconds",
            "From a prepared request entering the engine to its first generated token.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inter_token_latency = Histogram(
            "medmo_inter_token_latency_seconds",
            "Mean time between a request's generated tokens, one observation per request.",
            buckets=_STEP_BUCKETS,
            registry=self.registry,
        )
        self.prefill_seconds = Histogram(
            "medmo_prefill_seconds",
            "Duration of one prefill (the prompts and images of the requests starting together).",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.decode_graphs = Gauge(
            "medmo_decode_graphs",
            "Decode buckets replayed from captured graphs (0: the decode step runs eagerly).",
            registry=self.registry,
        )
        self.decode_step_seconds = Histogram(
            "medmo_decode_step_seconds",
            "Duration of one decode step (one token for every running request).",
            buckets=_STEP_BUCKETS,
            registry=self.registry,
        )
        # --- streamed answers ---
        self.stream_first_token = Histogram(
            "medmo_stream_first_token_seconds",
            "Streamed answers: from a request's arrival to its first text sent, by route.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.stream_tokens_per_second = Histogram(
            "medmo_stream_tokens_per_second",
            "Streamed answers: tokens written per second after the first, by route.",
            ["route"],
            buckets=(1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000),
            registry=self.registry,
        )
        self.rejections = Counter(
            "medmo_rejections",
            "Requests refused before running, by reason (queue_full, deadline, draining, dead, ...).",
            ["reason"],
            registry=self.registry,
        )
