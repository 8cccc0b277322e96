"""What a stage job works with, and what every stage job does the same way.

`WorkerContext`: the worker process's settings, Redis, ledger, queues and the resources its stage loaded
once (workers/runtime.py builds it before the worker takes its first job). It is handed to each job:
rq calls a job's function by the name the job carries with the job's arguments, and the StageWorker
runs jobs as `StageJob`s, which call that function with the worker's context first (runtime.py). So a
stage job is `def load_job(ctx: WorkerContext, batch_id: str)`; no module global holds the context.

With several models (shared/lanes.py) a process serves several lanes: `ctx.lanes` holds one context per
lane (its settings, spec, store or model, and its embed queue), and a job of a lane's batch (`BATCH~LANE`)
runs with that lane's context.

`stage_job`: the prologue and the bookkeeping of every batch job, once (dramatiq's middleware idea, at
our size): a job of a batch that is already finalised does nothing (a redelivery); a job of a lane's batch
gets that lane's context; the stages after the chunker check that the batch was planned for this worker's
embedding spec; the job reads and writes its
batch through a `RedisBatch` (payloads decoded there); the documents it reports go to
`embedpipe_documents_total{stage,outcome}`; one log line per job.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Concatenate, TypeVar

from redis import Redis
from redis.client import Pipeline
from rq import Queue, Retry

from shared.cache import VectorCache
from shared.embedding import Embedder
from shared.errors import ConfigError
from shared.ledger import RedisLedger
from shared.metrics import DOCUMENTS
from shared.queues import QUEUE_OF, enqueue_jobs
from shared.settings import Settings
from shared.spec import ChunkPolicy, EmbeddingSpec
from shared.store_types import Store
from shared.tokenizers import Tokenizer
from workers.batch_redis import RedisBatch

log = logging.getLogger(__name__)

T = TypeVar("T")
JobReport = dict[str, int]  # what a job did; documents_ok / _failed / _skipped are also counted as metrics


@dataclass
class StageResources:
    """What a stage loads once per process (workers/runtime.py); a pool has only what its stage needs."""

    spec: EmbeddingSpec | None = None
    store: Store | None = None
    tokenizer: Tokenizer | None = None
    chunk_policy: ChunkPolicy | None = None
    embedder: Embedder | None = None
    cache: VectorCache | None = None


@dataclass
class WorkerContext:
    settings: Settings
    redis: Redis
    ledger: RedisLedger
    queues: dict[str, Queue]  # by stage; "embed": this lane's embed queue
    resources: StageResources = field(default_factory=StageResources)
    lanes: dict[str, WorkerContext] = field(default_factory=dict)  # name -> context (several models)

    def for_lane(self, lane: str) -> WorkerContext:
        """The context of one lane's jobs; a lane this process does not serve is a configuration error."""
        if not lane and not self.lanes:
            return self
        if lane not in self.lanes:
            serves = ", ".join(repr(n) for n in self.lanes) or "one model (no EMBEDPIPE_MODELS)"
            raise ConfigError(
                f"a job of lane {lane!r} reached a worker that serves {serves}: "
                "all pools need the same EMBEDPIPE_MODELS"
            )
        return self.lanes[lane]

    @property
    def spec(self) -> EmbeddingSpec:
        return _loaded(self.resources.spec, "embedding spec")

    @property
    def store(self) -> Store:
        return _loaded(self.resources.store, "store")

    @property
    def tokenizer(self) -> Tokenizer:
        return _loaded(self.resources.tokenizer, "tokenizer")

    @property
    def chunk_policy(self) -> ChunkPolicy:
        return _loaded(self.resources.chunk_policy, "chunk policy")

    @property
    def embedder(self) -> Embedder:
        return _loaded(self.resources.embedder, "model")

    @property
    def cache(self) -> VectorCache | None:
        return self.resources.cache  # None: no embedding cache (EMBEDPIPE_CACHE_TTL_S=0)

    def batch(self, batch_id: str) -> RedisBatch:
        return RedisBatch(self.redis, batch_id, self.ledger, self.settings.payload_ttl_s)

    def enqueue_next(
        self, stage: str, args_list: list[tuple[Any, ...]], pipe: Pipeline, tokens: list[int] | None = None
    ) -> None:
        """Enqueue jobs of `stage` inside the caller's pipeline, so payloads and jobs land together."""
        enqueue_jobs(self.queues[QUEUE_OF.get(stage, stage)], self.settings, stage, args_list, pipe, tokens)


def _loaded(resource: T | None, what: str) -> T:
    if resource is None:
        raise RuntimeError(f"this worker has no {what}: a job ran on the wrong pool")
    return resource


StageRun = Callable[Concatenate[WorkerContext, RedisBatch, ...], JobReport | Retry]
StageJobFunction = Callable[Concatenate[WorkerContext, str, ...], JobReport | Retry]


def stage_job(stage: str, check_spec: bool = True) -> Callable[[StageRun], StageJobFunction]:
    """Make `run(ctx, batch, *args)` the rq job `job(ctx, batch_id, *args)` of `stage` (see the module)."""

    def decorate(run: StageRun) -> StageJobFunction:
        @functools.wraps(run)
        def job(ctx: WorkerContext, batch_id: str, *args: Any) -> JobReport | Retry:
            batch = ctx.batch(batch_id)
            if batch.finalized():
                return {"skipped": 1}  # a redelivered job of a batch that is already complete
            if batch.lane:
                ctx = ctx.for_lane(batch.lane)
            if check_spec:
                batch.check_spec(ctx.spec)
            started = time.perf_counter()
            report = run(ctx, batch, *args)
            if isinstance(report, dict):  # (an rq Retry: rescheduled, nothing done)
                for outcome in ("ok", "failed", "skipped"):
                    if report.get(f"documents_{outcome}"):
                        DOCUMENTS.labels(stage, outcome).inc(report[f"documents_{outcome}"])
                where = "/".join([batch_id, *map(str, args)])
                counts = " ".join(f"{k}={v}" for k, v in report.items())
                log.info("%s %s: %s in %.2f s", stage, where, counts, time.perf_counter() - started)
            return report

        return job

    return decorate
