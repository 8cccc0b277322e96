"""What a stage job works with: the worker process's settings, Redis, ledger, queues and the resources
its stage loaded once (workers/runtime.py builds it before the worker takes its first job)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from redis import Redis
from redis.client import Pipeline
from rq import Queue

from shared import keys
from shared.errors import ConfigError
from shared.ledger import RedisLedger
from shared.queues import QUEUE_OF, enqueue_jobs
from shared.settings import Settings


@dataclass
class WorkerContext:
    settings: Settings
    redis: Redis
    ledger: RedisLedger
    queues: dict[str, Queue]
    resources: dict[str, Any] = field(default_factory=dict)

    @property
    def tokenizer(self) -> Any:
        return self._resource("tokenizer")

    @property
    def chunk_policy(self) -> Any:
        return self._resource("chunk_policy")

    @property
    def embedder(self) -> Any:
        return self._resource("embedder")

    @property
    def store(self) -> Any:
        return self._resource("store")

    @property
    def spec(self) -> Any:
        return self._resource("spec")

    @property
    def cache(self) -> Any:
        return self._resource("cache")

    def _resource(self, name: str) -> Any:
        if name not in self.resources:
            raise RuntimeError(f"this worker has no {name}: a job ran on the wrong pool")
        return self.resources[name]

    def batch_finalized(self, batch_id: str) -> bool:
        return bool(self.redis.exists(keys.batch_finalized(batch_id)))


_context: WorkerContext | None = None


def context() -> WorkerContext:
    if _context is None:
        raise RuntimeError("no worker context: stage jobs run inside `embedpipe worker STAGE`")
    return _context


def set_context(ctx: WorkerContext) -> None:
    global _context
    _context = ctx


def check_spec(ctx: WorkerContext, batch_id: str) -> None:
    """Every stage of a batch must use the same embedding spec: a pool configured with another model
    (or dimensions, prefix, chunker) fails the job rather than mixing vectors."""
    planned = ctx.redis.hget(keys.batch_plan(batch_id), "spec")
    if planned is not None and planned.decode() != ctx.spec.fingerprint:
        raise ConfigError(
            f"batch {batch_id} was chunked for embedding spec {planned.decode()}, but this worker uses "
            f"{ctx.spec.fingerprint} ({ctx.spec.collection}): all pools need the same model settings"
        )


def enqueue_next(
    ctx: WorkerContext, stage: str, args_list: list[tuple[Any, ...]], pipe: Pipeline, tokens: list[int] | None = None
) -> None:
    """Enqueue jobs of `stage` inside the caller's pipeline, so payloads and jobs land together."""
    enqueue_jobs(ctx.queues[QUEUE_OF.get(stage, stage)], ctx.settings, stage, args_list, pipe, tokens)
