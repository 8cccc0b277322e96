"""Every Prometheus metric of embedpipe, in one module. Labels come from closed sets only (stage,
layer, outcome, reason): never a document ID, never an exception's text."""

from __future__ import annotations

import logging

from prometheus_client import Counter, start_http_server

log = logging.getLogger(__name__)

DOCUMENTS = Counter(
    "embedpipe_documents", "Documents that left a stage, by outcome (ok, failed).", ["stage", "outcome"]
)
RETRIES = Counter(
    "embedpipe_retries",
    "Retries by stage and layer: io = tenacity inside a job (HTTP, store), job = rq running a job again, "
    "redis = the worker reconnecting to Redis.",
    ["stage", "layer"],
)
DEAD_LETTERS = Counter(
    "embedpipe_dead_letters", "Documents that failed for good, by stage and reason.", ["stage", "reason"]
)


def serve(port: int) -> None:
    """Serve /metrics from this process (each worker is one process: no multiprocess mode needed)."""
    if port:
        start_http_server(port)
        log.info("metrics on :%d/metrics", port)


def count_retry(stage: str, layer: str):  # a tenacity before_sleep hook
    def hook(retry_state: object) -> None:
        RETRIES.labels(stage, layer).inc()

    return hook
