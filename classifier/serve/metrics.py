"""The server's Prometheus metrics, in a registry of its own (not the process-wide default one)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServeMetrics:
    """Requests by status, request and model latency, batch sizes, queue depth, and refused images by reason."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "classifier_requests", "HTTP requests by route and status code", ["route", "status"], registry=self.registry
        )
        self.request_latency = Histogram(
            "classifier_request_seconds",
            "Time from a request's arrival to its response, by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.model_latency = Histogram(
            "classifier_model_seconds", "Time of one batch's inference", buckets=LATENCY_BUCKETS, registry=self.registry
        )
        self.batch_size = Histogram(
            "classifier_batch_size", "Images per inference batch", buckets=BATCH_BUCKETS, registry=self.registry
        )
        self.queue_depth = Gauge("classifier_queue_depth", "Images waiting for a batch", registry=self.registry)
        self.refused = Counter(
            "classifier_images_refused", "Images refused, by reason", ["reason"], registry=self.registry
        )

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.model_latency.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
