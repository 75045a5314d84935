"""The REST API's Prometheus metrics (prometheus-client): requests by endpoint and status,
latency, images per forward pass, queue depth and the model served, in a registry of the
app's own, and the ASGI middleware that counts every request.

    metrics = ApiMetrics()
    app.add_middleware(metrics.middleware)      # outermost, so that it also counts the 413s
    metrics.describe(predictor, batcher)        # once the model is loaded
    metrics.render()                            # GET /metrics's answer
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.responses import Response

if TYPE_CHECKING:
    from batching import Batcher
    from predict import Predictor

API_VERSION = "1"


class ApiMetrics:
    """The Prometheus metrics of one app (its own registry, so several apps can coexist), and
    the ASGI middleware that counts every request by endpoint and status."""

    ENDPOINTS = ("/predict", "/health", "/metadata", "/metrics")

    def __init__(self):
        import prometheus_client as prom

        self.prom = prom
        self.registry = prom.CollectorRegistry()
        kw = {"registry": self.registry}
        self.requests = prom.Counter(
            "vit_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], **kw
        )
        self.latency = prom.Histogram(
            "vit_request_latency_seconds", "time to answer, by endpoint", ["endpoint"], **kw,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )  # fmt: skip
        self.batch_size = prom.Histogram(
            "vit_batch_size", "images per forward pass", buckets=(1, 2, 4, 8, 16, 32, 64, 128), **kw
        )
        self.queue_depth = prom.Gauge("vit_queue_depth", "requests waiting for the model", **kw)
        self.model = prom.Info("vit_model", "the model being served", **kw)

    def describe(self, predictor: Predictor, batcher: Batcher) -> None:
        prov = predictor.checkpoint.get("provenance", {})
        self.model.info(
            {
                "model_path": str(predictor.model_path),
                "created": str(prov.get("created", "")),
                "git_commit": str(prov.get("git_commit") or ""),
                "backend": predictor.backend,
                "api_version": API_VERSION,
            }
        )
        self.queue_depth.set_function(lambda: batcher.depth)

    def render(self) -> Response:
        return Response(
            self.prom.generate_latest(self.registry), media_type=self.prom.CONTENT_TYPE_LATEST
        )

    def middleware(self, app):
        async def counted(scope, receive, send):
            if scope["type"] != "http":
                return await app(scope, receive, send)
            path = scope["path"]
            endpoint = path if path in self.ENDPOINTS else "other"
            status = {"code": 500}

            async def send_status(message):
                if message["type"] == "http.response.start":
                    status["code"] = message["status"]
                await send(message)

            with self.latency.labels(endpoint).time():
                try:
                    await app(scope, receive, send_status)
                finally:
                    self.requests.labels(endpoint, str(status["code"])).inc()

        return counted
