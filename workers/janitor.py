"""The janitor: one per deployment. It turns the inbox into load batches, runs rq's scheduler (retries
with a delay need it) and runs rq's registry clean-up for every queue every few seconds, so a job
of a killed worker is recovered about job_timeout + 60 s after it started, not when some idle worker
next gets around to it (rq does that only every 10 minutes).
"""

from __future__ import annotations

import hashlib
import logging
import signal
import time
from typing import Any

from redis import Redis
from rq import SimpleWorker
from rq.scheduler import RQScheduler
from rq.serializers import JSONSerializer

from producer.submit import enqueue_batch
from shared import keys
from shared.errors import DecodeError
from shared.ledger import RedisLedger
from shared.messages import DeadLetter, decode_inbox_message
from shared.settings import STAGES, Settings
from workers.runtime import connect, queue

log = logging.getLogger(__name__)

CLEAN_INTERVAL_S = 5.0
IDLE_SLEEP_S = 0.25


def drain_inbox(redis: Redis, settings: Settings, ledger: RedisLedger, flush: bool) -> int:
    """Move up to one batch of inbox messages into a load job; return how many were taken.
    Without `flush`, a partial batch waits for more messages."""
    raw = redis.lrange(keys.INBOX, 0, settings.batch_docs - 1)
    if not raw or (len(raw) < settings.batch_docs and not flush):
        return 0
    sources, dead = [], []
    for message in raw:
        try:
            sources.append(decode_inbox_message(message))
        except DecodeError as e:
            dead.append(DeadLetter(_inbox_id(message), "inbox", "decode_error", str(e), source={"raw": message[:4096]}))
    with redis.pipeline() as pipe:
        if sources:
            enqueue_batch(redis, settings, sources, pipe)
        ledger.add_dead(dead, pipe=pipe)
        pipe.ltrim(keys.INBOX, len(raw), -1)  # only the janitor takes from the head; clients push to the tail
        pipe.execute()
    log.info("inbox: %d documents batched, %d undecodable", len(sources), len(dead))
    return len(raw)


def _inbox_id(message: bytes) -> str:
    """The id of an undecodable message if one can be read out of it, else a hash of its bytes."""
    try:
        import json

        doc_id = json.loads(message).get("id")
        if isinstance(doc_id, str) and doc_id:
            return doc_id
    except Exception:  # the message is undecodable: that is why we are here
        pass
    return "inbox:" + hashlib.sha1(message).hexdigest()[:16]


class Janitor:
    def __init__(self, settings: Settings, redis: Redis | None = None) -> None:
        self.settings = settings
        self.redis = redis or connect(settings)
        self.ledger = RedisLedger(self.redis)
        queues = [queue(self.redis, s) for s in STAGES]
        # A worker object that never works: it only lends rq's own maintenance routine.
        self.maintenance = SimpleWorker(queues, connection=self.redis, serializer=JSONSerializer)
        self.scheduler = RQScheduler(queues, connection=self.redis, serializer=JSONSerializer)
        self._stop = False
        self._last_clean = 0.0
        self._inbox_waiting_since: float | None = None

    def request_stop(self, *_: Any) -> None:
        self._stop = True

    def tick(self, flush: bool = False) -> int:
        """One round of housekeeping; returns how many inbox messages it took."""
        now = time.monotonic()
        waiting = self.redis.llen(keys.INBOX) > 0
        if waiting and self._inbox_waiting_since is None:
            self._inbox_waiting_since = now
        due = self._inbox_waiting_since is not None and now - self._inbox_waiting_since >= self.settings.inbox_wait_s
        taken = drain_inbox(self.redis, self.settings, self.ledger, flush=flush or due)
        if taken or not waiting:
            self._inbox_waiting_since = None
        self.scheduler.acquire_locks()
        self.scheduler.enqueue_scheduled_jobs()
        if now - self._last_clean >= CLEAN_INTERVAL_S:
            self.maintenance.clean_registries()
            self._last_clean = now
        return taken

    def run(self, burst: bool = False) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        log.info("janitor on %s", self.settings.redis_url_redacted)
        try:
            while not self._stop:
                taken = self.tick(flush=burst)
                if burst and not taken and self.redis.llen(keys.INBOX) == 0:
                    break
                if not taken:
                    time.sleep(IDLE_SLEEP_S)
        finally:
            self.scheduler.release_locks()
        log.info("janitor stopped")
