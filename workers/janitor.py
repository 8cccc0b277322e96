"""The janitor: one per deployment (several are safe). It turns the inbox into load batches
(workers/inbox.py) while the pipeline has room (shared/backpressure.py), runs rq's scheduler
(retries with a delay need it) and runs rq's registry clean-up for every queue every few seconds, so
a job of a killed worker is retried within CLEAN_INTERVAL_S of its lease running out (job_lease_s
after its worker's last heartbeat: workers/lease.py), not when some idle worker next gets around to
it (rq does that only every 10 minutes). Each housekeeping step is guarded on its own; the last round
with every step done is exported and kept in Redis for the health check.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
import uuid
from dataclasses import replace
from typing import Any, Protocol

from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq import SimpleWorker
from rq.job import Job
from rq.registry import FailedJobRegistry
from rq.scheduler import RQScheduler
from rq.serializers import JSONSerializer
from rq.utils import utcparse

from shared import metrics
from shared.backpressure import Backpressure
from shared.errors import DecodeError
from shared.lanes import lanes
from shared.ledger import RedisLedger
from shared.messages import Chunk, DeadLetter, Document
from shared.metrics import RETRIES, serve
from shared.queues import (
    JOB_FUNCTIONS,
    connect,
    distributed_status,
    embed_pool,
    enqueue_jobs,
    is_idle,
    pools,
    queue,
    queue_name,
    stage_of,
)
from shared.settings import Settings
from workers.batch_redis import RedisBatch
from workers.inbox import Inbox
from workers.runtime import yield_cpu

log = logging.getLogger(__name__)

CLEAN_INTERVAL_S = 5.0
EXPORT_INTERVAL_S = 2.0
IDLE_SLEEP_S = 0.25
PROBE_TIMEOUT_S = 1800
FAILED_JOBS_PER_ROUND = 200  # per stage: after an outage fails 10k jobs, the rounds (and the inbox) still come round


# Housekeeping steps, each guarded on its own: one that fails (a corrupt key, a bug) is logged and
# counted, and the others still run; the round then is not a good one (JANITOR_TICK does not advance).
STEPS = ("inbox", "recovery", "scheduler", "failed_jobs", "export")
ROUND_LIMIT_S = 300  # a round (its Redis calls retrying through an outage) plus its backoff sleep, at most
STALE_TICK_S = 60  # a janitor whose last good round is older than this is unhealthy (health, alert)


# rq's maintenance logs each queue's clean-up at INFO (its logger is INFO whatever the settings): here four
# lines every 5 s, ~70k a day. Its warnings and errors still show.
RQ_MAINTENANCE_LOG = logging.getLogger("workers.janitor.rq")
RQ_MAINTENANCE_LOG.setLevel(logging.WARNING)


class Janitor:
    def __init__(self, settings: Settings, redis: Redis | None = None) -> None:
        self.settings = settings
        self.redis = redis or connect(settings)
        self.keys = settings.keys
        self.ledger = RedisLedger(self.redis, self.keys, settings.dead_source_ttl_s)
        self.inbox = Inbox(self.redis, settings, self.ledger, uuid.uuid4().hex)
        self.pressure = Backpressure(self.redis, settings, "inbox")
        self._held_at: float | None = None  # since when the inbox is held (backpressure)
        queues = [queue(self.redis, p, settings.namespace) for p in pools(settings)]  # its namespace's only
        # A worker object that never works: it only lends rq's own maintenance routine.
        self.maintenance = SimpleWorker(queues, connection=self.redis, serializer=JSONSerializer)
        self.maintenance.log = RQ_MAINTENANCE_LOG
        self.scheduler = RQScheduler(queues, connection=self.redis, serializer=JSONSerializer)
        self._stop = False
        self._last_clean = 0.0
        self._last_export = 0.0
        self._inbox_waiting_since: float | None = None

    def request_stop(self, *_: Any) -> None:
        self._stop = True

    def tick(self, flush: bool = False) -> int:
        """One round of housekeeping; returns how many inbox messages it took. Each step is guarded
        on its own; a round with every step done is recorded as the last good one."""
        now = time.monotonic()
        self.inbox.keep_alive()
        taken = 0
        ok = True

        def step(name: str, run: Any) -> Any:
            nonlocal ok
            try:
                return run()
            except (RedisConnectionError, RedisTimeoutError):
                raise  # Redis itself is gone: the runner backs off
            except Exception:  # a corrupt key or a bug in one step must not stop the others
                ok = False
                metrics.JANITOR_STEP_ERRORS.labels(name).inc()
                log.exception("janitor step %s failed; the other steps go on", name)
                return None

        taken = step("inbox", lambda: self._drain(now, flush)) or 0
        if now - self._last_clean >= CLEAN_INTERVAL_S:
            step("recovery", self._clean)
            self._last_clean = now
        step("scheduler", self.scheduler.enqueue_scheduled_jobs)
        step("failed_jobs", lambda: expand_failed_jobs(self.redis, self.settings, self.ledger))
        if now - self._last_export >= EXPORT_INTERVAL_S:
            step("export", self._export)
            self._last_export = now
        if ok:
            at = time.time()
            metrics.JANITOR_LAST_TICK.set(at)
            self.redis.set(self.keys.JANITOR_TICK, at, ex=24 * 3600)
        return taken

    def _drain(self, now: float, flush: bool) -> int:
        waiting = self.redis.llen(self.keys.INBOX) > 0
        if waiting and (why := self.pressure.held()):
            # Backpressure, as for `enqueue`: documents wait in the inbox, their smallest form in Redis,
            # not as claim checks that grow at each stage (~7x the message after the embed pool).
            if self._held_at is None:
                log.info("inbox held: %s", why)
            else:
                metrics.HELD.labels("janitor").inc(now - self._held_at)
            self._held_at = now
            return 0
        if self._held_at is not None:
            log.info("inbox no longer held")
            self._held_at = None
        if waiting and self._inbox_waiting_since is None:
            self._inbox_waiting_since = now
        due = self._inbox_waiting_since is not None and now - self._inbox_waiting_since >= self.settings.inbox_wait_s
        taken = self.inbox.drain(flush=flush or due)
        if taken or not waiting:
            self._inbox_waiting_since = None
        return taken

    def _clean(self) -> None:
        self.scheduler.acquire_locks()  # take or refresh the scheduler locks (they live 61 s)
        self.maintenance.clean_registries()  # abandoned jobs of dead workers: retried or failed
        self.inbox.recover()  # batches of janitors that died holding them: back into the inbox
        self.ledger.expire_dead(self.settings.dead_letter_ttl_s, self.settings.max_dead_letters)

    def _export(self) -> None:
        status = distributed_status(self.redis, self.settings)
        export_state(self.redis, self.settings.namespace, self.ledger, status)
        if self.settings.probe_eval and is_idle(status):
            request_probe(self.redis, self.settings, self.ledger, status["chunks_written"])

    def run(self, burst: bool = False) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        yield_cpu(self.settings)
        serve(self.settings.metrics_port, "janitor")
        log.info("janitor on %s", self.settings.redis_url_redacted)
        delay = 1.0
        while not self._stop:
            metrics.LOOP.begin("a housekeeping round", ROUND_LIMIT_S)  # liveness: the round must end
            try:
                taken = self.tick(flush=burst)
                delay = 1.0
                if burst and not taken and self.redis.llen(self.keys.INBOX) == 0:
                    break
                if not taken:
                    time.sleep(IDLE_SLEEP_S)
            except (RedisConnectionError, RedisTimeoutError) as e:
                RETRIES.labels("janitor", "redis").inc()
                log.warning("lost Redis at %s (%s); retrying in %.0f s", self.settings.redis_url_redacted, e, delay)
                time.sleep(delay)
                delay = min(delay * 2, 30.0)
            except Exception:  # this loop is the janitor's runner: one bad round must not end housekeeping
                log.exception("janitor round failed; next round in %.0f s", delay)
                time.sleep(delay)
                delay = min(delay * 2, 30.0)
        with contextlib.suppress(RedisConnectionError, RedisTimeoutError):
            self.scheduler.release_locks()
        log.info("janitor stopped")


def export_state(redis: Redis, namespace: str, ledger: RedisLedger, status: dict[str, Any]) -> None:
    """The pipeline's (the namespace's) state as Prometheus gauges: queues, workers, dead letters, the
    quality probe. The labels are the stages; a namespace's janitor exports its own namespace."""
    for stage, s in status["stages"].items():
        metrics.QUEUE_JOBS.labels(stage, "queued").set(s["queued"] + s["dequeuing"])
        metrics.QUEUE_JOBS.labels(stage, "running").set(s["running"])
        metrics.QUEUE_JOBS.labels(stage, "scheduled").set(s["scheduled"] + s["deferred"])
        metrics.QUEUE_JOBS.labels(stage, "failed").set(s["failed"])
        metrics.WORKERS.labels(stage).set(s["workers"])
        oldest = redis.lindex(queue(redis, stage, namespace).key, 0)
        enqueued = redis.hget(f"rq:job:{oldest.decode()}", "enqueued_at") if oldest else None
        age = time.time() - utcparse(enqueued.decode()).timestamp() if enqueued else 0.0
        metrics.QUEUE_OLDEST_AGE.labels(stage).set(max(age, 0.0))
    for model, counts in status.get("models", {}).items():  # a bounded label: EMBEDPIPE_MODELS's entries
        for outcome in ("done", "skipped"):
            metrics.MODEL_DOCUMENTS.labels(model, outcome).set(counts.get(f"documents_{outcome}", 0))
    metrics.INBOX.set(status["inbox"])
    metrics.DEAD_LETTERS_NOW.set(status["documents_failed"])
    metrics.set_recent_failures(ledger.recent_dead())
    probe = ledger.last_probe()
    if probe:
        metrics.QUALITY_RECALL.labels(probe["collection"]).set(probe["recall_at_10"])
        metrics.QUALITY_NDCG.labels(probe["collection"]).set(probe["ndcg_at_10"])
        metrics.QUALITY_AT.labels(probe["collection"]).set(probe["at"])


def request_probe(redis: Redis, settings: Settings, ledger: RedisLedger, chunks_written: int) -> None:
    """The pipeline went idle after new writes: probe the quality once for this state of the store."""
    if not chunks_written or ledger.last_probe().get("chunks_written") == chunks_written:
        return
    previous = redis.set(settings.keys.PROBE_REQUESTED, chunks_written, get=True)
    if previous == str(chunks_written).encode():
        return  # already requested for this state
    with redis.pipeline() as pipe:
        enqueue_jobs(
            queue(redis, embed_pool(lanes(settings)[0].name), settings.namespace),  # the first model's pool
            settings,
            "probe",
            [(settings.probe_eval, chunks_written)],
            pipe,
            timeout_s=PROBE_TIMEOUT_S,
        )
        pipe.execute()
    log.info("quality probe requested (%d chunks written)", chunks_written)


def expand_failed_jobs(redis: Redis, settings: Settings, ledger: RedisLedger) -> int:
    """Turn jobs that failed for good (exception after its retries, timeout, abandoned by a killed
    worker, refused) into dead letters for each of their documents, then drop the jobs: the oldest
    FAILED_JOBS_PER_ROUND of each stage per round, the rest in the next rounds."""
    expanded = 0
    for pool in pools(settings):
        stage = stage_of(pool)
        registry = FailedJobRegistry(queue_name(pool, settings.namespace), connection=redis, serializer=JSONSerializer)
        for job_id in registry.get_job_ids(0, FAILED_JOBS_PER_ROUND - 1):
            func, args, message = read_failed_job(redis, job_id)
            batch_id = args[0] if args and isinstance(args[0], str) else None
            batch = RedisBatch(redis, batch_id, ledger, settings.payload_ttl_s) if batch_id is not None else None
            letters, failed_part = failed_job_letters(stage, job_id, func, args, message, batch)
            if batch is not None and batch.lane:  # the letter names the model whose job failed
                letters = [replace(d, spec=batch.lane) for d in letters]
            with redis.pipeline() as pipe:
                ledger.add_dead(letters, pipe=pipe)
                if batch is not None and failed_part is not None:
                    batch.record_failed_part(failed_part, pipe)
                pipe.zrem(registry.key, job_id)
                pipe.execute()
            if batch is not None and failed_part is not None and batch.accounted():
                with redis.pipeline() as pipe:
                    enqueue_jobs(queue(redis, "write", settings.namespace), settings, "finalize", [(batch.id,)], pipe)
                    pipe.execute()
            expanded += 1
            log.warning("job %s failed for good: %d dead letters", job_id, len(letters))
    return expanded


def read_failed_job(redis: Redis, job_id: str) -> tuple[str, list[Any], str]:
    """The function, arguments and last error line of a failed job, whatever state its hash is in."""
    try:
        job = Job.fetch(job_id, connection=redis, serializer=JSONSerializer)
        result = job.latest_result()
        message = (result.exc_string if result and result.exc_string else job.exc_info or "no details").strip()
        func, args = job.func_name, list(job.args)
    except Exception as e:  # a job we cannot even read (foreign serializer, corrupt hash)
        message, func, args = f"unreadable job: {type(e).__name__}: {e}", "", []
    return func, args, message.splitlines()[-1][:2000] if message else "failed"


class JobPayloads(Protocol):
    """What a failed job's batch still holds (RedisBatch); a payload that expired raises DecodeError."""

    def sources(self) -> list[dict[str, Any]]: ...
    def documents(self) -> list[Document]: ...
    def chunks(self, part: int) -> list[Chunk]: ...
    def doc_ids(self) -> list[str]: ...


def failed_job_letters(
    stage: str, job_id: str, func: str, args: list[Any], message: str, batch: JobPayloads | None
) -> tuple[list[DeadLetter], int | None]:
    """The documents a failed job carried, as dead letters with their sources (for redrive), and the
    part that failed with it (embed and write jobs), whose documents the batch's finalisation removes."""
    if batch is None or func not in JOB_FUNCTIONS.values() or func == JOB_FUNCTIONS["prune"]:  # prune: no batch
        return [DeadLetter(f"job:{job_id}", stage, "job_failed", f"{func or 'unknown function'}: {message}")], None
    try:
        sources = {s.get("id"): s for s in batch.sources() if isinstance(s, dict)}
        if func.endswith(("embed_job", "write_job")):
            part: int | None = int(args[1])
            ids = {c.doc_id for c in batch.chunks(int(args[1]))}
        elif func.endswith("chunk_job"):
            part, ids = None, {d.id for d in batch.documents()}
        else:
            part, ids = None, set(sources)
    except DecodeError as e:  # the payloads expired before the batch completed: its documents by ID
        known = batch.doc_ids()
        if not known:
            return [DeadLetter(f"batch:{args[0]}", stage, "job_failed", f"{message} (and {e})")], None
        return [DeadLetter(i, stage, "job_failed", f"{message} (and {e})") for i in sorted(known)], None
    letters = [DeadLetter(i, stage, "job_failed", message, source=sources.get(i)) for i in sorted(ids) if i]
    return letters, part
