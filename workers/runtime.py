"""The distributed runtime: one rq SimpleWorker per process on exactly one stage queue.

The worker loads what its stage needs (tokenizer, model, store) once, before `work()`, into a
WorkerContext, and hands it to every job it runs (StageJob: the job's function is called with the
context first, then the job's own arguments). SimpleWorker runs jobs in this process: the default forking
Worker would reload the model for every job and could not use a CUDA context made in the parent.
With a single queue rq dequeues with BLMOVE, so a job of a worker killed after the pop is recovered;
a running job holds a lease that a heartbeat renews (workers/lease.py), so a job of a killed worker is
recovered about `job_lease_s` after the kill, not job_timeout + 60 s after its start.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import replace
from typing import Any

from redis import Redis
from redis.exceptions import ConnectionError, TimeoutError
from rq import Queue, SimpleWorker
from rq.executions import Execution
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.utils import now as rq_now
from rq.worker import WorkerStatus

from shared.backpressure import HOLD_POLL_S, LATER, Backpressure
from shared.cache import RedisVectorCache
from shared.errors import ConfigError
from shared.lanes import Lane, lanes, own_lane
from shared.ledger import RedisLedger
from shared.metrics import HELD, JOBS, LOOP, RETRIES, observe_stored, running_job, serve
from shared.queues import ALLOWED, ARGUMENTS, JOB_FUNCTIONS, MAX_ARGUMENT_CHARS, connect, embed_pool, queue, stage_of
from shared.settings import STAGES, Settings
from shared.spec import chunk_policy, spec_for
from shared.store import open_store
from shared.tokenizers import Tokenizer, load_tokenizer
from workers.context import StageResources, WorkerContext
from workers.embed import make_embedder
from workers.fetch import FetchPolicy
from workers.lease import JobLease, beat_timeout_s

log = logging.getLogger(__name__)

# Liveness (/livez): on top of rq's own waits and timeouts, room for Redis's client retries (~35 s),
# rq's reconnect sleeps (up to 60 s) and a slow host, so that only a wedged loop goes past it.
LOOP_SLACK_S = 180


def init_context(settings: Settings, stage: str, redis: Redis | None = None) -> WorkerContext:
    """Load what the stage needs, once per process: for each lane it serves (several models: the chunk
    and write pools serve every lane, an embed pool the one its --model names), and the first of them
    as the process's own context."""
    redis = redis or connect(settings)
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    ledger = RedisLedger(redis, settings.keys, settings.dead_source_ttl_s)
    queues = {s: queue(redis, s, settings.namespace) for s in STAGES}
    if stage == "load":
        FetchPolicy.parse(settings.fetch_allow)  # a malformed allow list is a ConfigError at start
        return WorkerContext(settings, redis, ledger, queues)
    served = [own_lane(settings)] if stage == "embed" else lanes(settings)
    tokenizers: dict[str, Tokenizer] = {}  # one per model: lanes of one model chunk once (workers/chunk.py)
    contexts = {}
    for lane in served:
        lane_queues = queues | {"embed": queue(redis, embed_pool(lane.name), settings.namespace)}
        contexts[lane.name] = WorkerContext(
            lane.settings, redis, ledger, lane_queues, _resources(lane, stage, redis, tokenizers)
        )
    first = contexts[served[0].name]
    return replace(first, lanes=contexts if served[0].name else {})


def _resources(lane: Lane, stage: str, redis: Redis, tokenizers: dict[str, Tokenizer]) -> StageResources:
    settings = lane.settings
    loaded = StageResources(spec=spec_for(settings))
    if stage in ("chunk", "write"):  # chunk: skips documents the store holds unchanged
        # they only look IDs up: a small index cache keeps their memory flat as the store grows
        lookups = replace(settings, index_cache_mb=settings.writer_index_cache_mb)
        loaded.store = open_store(settings.store, loaded.spec, settings=lookups)
    if stage == "chunk":
        if settings.model not in tokenizers:
            tokenizers[settings.model] = load_tokenizer(settings.model, settings.api_max_input_tokens)
        loaded.tokenizer = tokenizers[settings.model]
        loaded.chunk_policy = chunk_policy(settings, loaded.tokenizer)
    elif stage == "embed":
        loaded.embedder = make_embedder(settings, redis).warm_up()
        # 0: none (at millions of chunks the cache is most of Redis: deploy/README.md, Sizing Redis)
        share = settings.cache_redis_share  # of maxmemory: past it, new vectors are not cached
        loaded.cache = RedisVectorCache(redis, settings.cache_ttl_s, share) if settings.cache_ttl_s else None
    return loaded


class StageJob(Job):
    """An rq job whose function gets the worker's context first: `func(ctx, *args)`. rq stores and
    shows the job as it was enqueued (function name and JSON arguments); only the call differs."""

    context: WorkerContext | None = None

    def _execute(self) -> Any:
        if self.context is None:
            raise RuntimeError(f"job {self.id} has no worker context: stage jobs run inside `embedpipe worker STAGE`")
        return self.func(self.context, *self.args, **self.kwargs)


class StageWorker(SimpleWorker):
    """Runs only embedpipe's own stage function for its queue: a job naming any other function
    (os.system, say) is refused and never imported or executed. It hands its context to each job it
    runs (StageJob). A running job holds a lease of `job_lease_s` that a side thread renews
    (workers/lease.py): the worker exits with code 75 (LEASE_LOST_EXIT_CODE) when it can no longer
    renew it, rather than run the job on unguarded."""

    def __init__(self, queues: list[Queue], *, context: WorkerContext, **kwargs: Any) -> None:
        super().__init__(queues, job_class=StageJob, **kwargs)
        self.context = context
        settings = self.settings = context.settings
        self.lease_s = settings.job_lease_s
        self.lease_redis = connect(settings, retries=0, timeout_s=beat_timeout_s(self.lease_s))
        self._lease: JobLease | None = None
        self.stage = stage_of(queues[0].name)
        grows = self.stage in LATER  # a pool whose jobs grow the work in Redis: all but the writers
        self.pressure = Backpressure(self.connection, settings, self.stage) if grows else None

    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None) -> Any:
        """A loader, chunker or embedder takes no job while Redis is past EMBEDPIPE_HOLD_REDIS_SHARE of its
        maxmemory and a later stage has work queued (shared/backpressure.py): that work drains first."""
        if self.pressure is not None and (why := self.pressure.held()):
            self.set_state(WorkerStatus.IDLE)  # a SIGTERM now stops the worker at once (rq's StopRequested)
            log.info("%s worker %s held: %s", self.stage, self.name, why)
            waited_since = time.monotonic()
            while self.pressure.held():
                self.heartbeat()  # rq's registration and this loop's liveness
                time.sleep(HOLD_POLL_S)
                HELD.labels(self.stage).inc(time.monotonic() - waited_since)
                waited_since = time.monotonic()
            log.info("%s worker %s no longer held", self.stage, self.name)
        return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)

    def get_heartbeat_ttl(self, job: Job) -> int:
        """The first registration of a job takes the lease too (SimpleWorker's: timeout + 60 s)."""
        return self.lease_s

    def prepare_execution(self, job: Job) -> Execution:
        held_since = time.monotonic()
        execution = super().prepare_execution(job)
        self._lease = JobLease(self, job, execution, self.lease_redis, self.lease_s, held_since).start()
        return execution

    def handle_execution_ended(self, job: Job, queue: Queue, heartbeat_ttl: int) -> None:
        self._end_lease()  # before rq removes the job's entries
        super().handle_execution_ended(job, queue, heartbeat_ttl)

    def _end_lease(self) -> None:
        if self._lease is not None:
            self._lease.stop()
            self._lease = None

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        if pipeline is None:  # the loop's own beat, each round of its wait (the lease thread's is pipelined)
            LOOP.begin("waiting for a job", self.dequeue_timeout + LOOP_SLACK_S)
        super().heartbeat(timeout, pipeline)

    def execute_job(self, job: Job, queue: Queue) -> Any:
        if isinstance(job, StageJob):
            job.context = self.context
        stage = stage_of(queue.name)  # the queue's name carries the namespace; labels and rules are per stage
        refusal = refusal_of(job, stage)
        if refusal is not None:
            log.error("refused job %s: %s", job.id, refusal)
            disarm(job)
            job.func_name = "workers.runtime.refused_job"
            job.args, job.kwargs = (job.id, refusal), {}
            job.retries_left = 0
        elif job.retries_left is not None and job.retries_left < self.settings.job_retries:
            RETRIES.labels(stage, "job").inc()
        queued_s = (rq_now() - job.enqueued_at).total_seconds() if job.enqueued_at else 0.0
        stuck_s = self.settings.stuck_job_s or (job.timeout or Queue.DEFAULT_TIMEOUT) + LOOP_SLACK_S
        try:
            with running_job(stage, job.id, queued_s, stuck_s):
                return super().execute_job(job, queue)
        finally:
            self._end_lease()  # also when rq's bookkeeping raised (Redis gone)

    def unsubscribe(self) -> None:
        """rq's, without an unbounded wait. Since redis-py 8.2, PubSubWorkerThread.stop() joins the thread,
        which can sit up to rq's sleep_time (60 s) in get_message: a SIGTERMed idle worker took a minute to
        exit (seen in CI). Stop the daemon thread's loop and give it a second; it closes its connection
        itself when its read returns."""
        if self.pubsub_thread:
            self.pubsub_thread._running.clear()  # what stop() does, before its join
            self.pubsub_thread.join(timeout=1)

    def handle_job_success(self, job: Job, queue: Queue, started_job_registry: StartedJobRegistry) -> None:
        JOBS.labels(stage_of(queue.name), "ok").inc()
        if job.func_name == JOB_FUNCTIONS["write"]:
            observe_stored(job.args[0])
        super().handle_job_success(job, queue, started_job_registry)

    def handle_job_failure(self, job: Job, queue: Queue, *args: Any, **kwargs: Any) -> None:
        JOBS.labels(stage_of(queue.name), "failed").inc()
        super().handle_job_failure(job, queue, *args, **kwargs)


def refusal_of(job: Job, stage: str) -> str | None:
    """Why a job must not run on this queue's pool, or None. rq acts on more of a job than its function:
    it imports and calls callbacks, posts to webhooks, holds jobs for dependencies. A stage job has none
    of them, no keyword arguments, and exactly its function's positional arguments."""
    allowed = ALLOWED.get(stage, set())
    func = str(job.func_name)[:200]
    if job.func_name not in allowed:
        return f"it names {func!r}, which is not an embedpipe stage (this pool runs only {sorted(allowed)})"
    callbacks = [job._success_callback_name, job._failure_callback_name, job._stopped_callback_name]
    if any(callbacks) or job.webhooks or job._dependency_ids:
        return f"{func} carries callbacks, webhooks or dependencies, which embedpipe never enqueues"
    function = next(s for s, f in JOB_FUNCTIONS.items() if f == job.func_name)
    kinds, args = ARGUMENTS[function], list(job.args or ())
    fits = len(args) == len(kinds) and all(
        type(a) is k and (not isinstance(a, str) or len(a) <= MAX_ARGUMENT_CHARS)
        for a, k in zip(args, kinds, strict=False)
    )
    if job.kwargs or not fits:
        return f"{func} takes ({', '.join(k.__name__ for k in kinds)}), not these arguments"
    return None


def disarm(job: Job) -> None:
    """Clear what rq would act on for a refused job, in memory and in its Redis hash."""
    job._success_callback_name = job._failure_callback_name = job._stopped_callback_name = None
    job._success_callback = job._failure_callback = job._stopped_callback = None
    job.webhooks, job._dependency_ids = [], []
    job.connection.hdel(
        job.key, "success_callback_name", "failure_callback_name", "stopped_callback_name", "webhooks", "dependency_ids"
    )


def refused_job(ctx: WorkerContext, job_id: str, refusal: str = "") -> None:
    raise PermissionError(f"job {job_id} refused: {refusal}")


def yield_cpu(settings: Settings) -> None:
    """Lower this process's CPU priority by EMBEDPIPE_SUPPORT_NICE: the embedder is the bottleneck, and
    a loader, chunker, writer or janitor beside it on the same cores should run in its gaps, not preempt
    one of its threads (which stalls the others at the next sync). Measured on 2 cores: 0.89 and 0.89
    of bare encode without, 1.01 and 0.95 with (bench/README.md). Nice 10 still leaves these workers
    ~10% of a contended core, several times what they need, and all of an idle one."""
    if settings.support_nice:
        os.nice(settings.support_nice)


def run_worker(settings: Settings, stage: str, burst: bool = False) -> None:
    """Work until SIGTERM (or an empty queue with `burst`). If Redis goes away for longer than the
    client's own retries, rq's loop quits: start a new worker with backoff instead of dying."""
    ctx = init_context(settings, stage)
    if stage != "embed":
        yield_cpu(settings)
    serve(settings.metrics_port, stage, ctx.settings.model)
    delay = 1.0
    while True:
        LOOP.begin("starting an rq worker", delay + LOOP_SLACK_S)
        worker = None
        try:
            worker = StageWorker([ctx.queues[stage]], context=ctx, connection=ctx.redis, serializer=JSONSerializer)
            log.info("%s worker %s on %s", stage, worker.name, settings.redis_url_redacted)
            worker.work(burst=burst, logging_level=settings.log_level, with_scheduler=False)
            delay = 1.0
        except (ConnectionError, TimeoutError) as e:
            log.warning("lost Redis at %s: %s", settings.redis_url_redacted, e)
        # rq records a SIGTERM/SIGINT in _shutdown_requested_date (its _stop_requested only when busy)
        if burst or (worker is not None and worker._shutdown_requested_date is not None):
            return
        RETRIES.labels(stage, "redis").inc()
        log.warning("%s worker stopped unexpectedly; reconnecting in %.0f s", stage, delay)
        # no job runs between workers: a SIGTERM now simply ends the process
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        time.sleep(delay)
        delay = min(delay * 2, 30.0)
