"""The job lease: a running job's entry in rq's StartedJobRegistry (`rq:wip:<queue>`) expires
`job_lease_s` after the worker's last heartbeat, so the janitor's registry clean-up (every 5 s) hands
the job of a killed worker back to its queue about a lease after the kill, however long the job.

rq's SimpleWorker sends no heartbeat while a job runs and registers the job until job_timeout + 60 s
after its start: without this, a killed worker's job with a 20-minute timeout would wait 21 minutes.
Here a daemon thread renews the lease every lease/4 s, through a Redis client of its own whose
connects and reads give up after a short timeout (the worker's main client has none: its dequeue
blocks). A worker whose beats stop succeeding ends itself with LEASE_LOST_EXIT_CODE before the lease
runs out, so its job is not redone while it still runs it (given clocks in step; a worker frozen past
its lease, by SIGSTOP or a paused VM, exits at its next beat); the platform restarts it, and its job is
redone like a killed worker's.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from redis import Redis
from rq.executions import Execution
from rq.job import Job
from rq.worker import BaseWorker

log = logging.getLogger(__name__)

# EX_TEMPFAIL (sysexits.h): this worker lost its lease; restart it, its job is redone elsewhere.
LEASE_LOST_EXIT_CODE = 75


def beat_interval_s(lease_s: float) -> float:
    return lease_s / 4


def beat_timeout_s(lease_s: float) -> float:
    """How long one connect or one read of a beat may wait."""
    return min(2.0, lease_s / 10)


def give_up_s(lease_s: float) -> float:
    """No beat succeeded for this long: exit. rq scores the registry in whole seconds (1 s lost), a
    last beat may still hang for a connect and a read, and a tenth of the lease is for scheduling."""
    return lease_s - 1 - 2 * beat_timeout_s(lease_s) - lease_s / 10


class JobLease:
    """Renews one running job's lease from a daemon thread, from `start()` until `stop()`."""

    def __init__(
        self, worker: BaseWorker, job: Job, execution: Execution, redis: Redis, lease_s: int, held_since: float
    ) -> None:
        self.worker, self.job, self.execution, self.redis = worker, job, execution, redis
        self.lease_s = lease_s
        self.registry = job.started_job_registry
        self._last_ok = held_since  # time.monotonic() before the registration that took the lease
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease {job.id}", daemon=True)

    def start(self) -> JobLease:
        self._thread.start()
        return self

    def stop(self) -> None:
        """No beat after this returns: rq may now remove the job's entries without a beat re-adding any."""
        self._stopped.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(4 * beat_timeout_s(self.lease_s) + 1)

    def _run(self) -> None:
        give_up = give_up_s(self.lease_s)
        while not self._stopped.wait(
            max(0.0, min(beat_interval_s(self.lease_s), self._last_ok + give_up - time.monotonic()))
        ):
            sent = time.monotonic()
            try:
                held = self._beat()
            except Exception as e:  # any failure counts against the lease; the deadline below decides
                log.warning("job %s: lease heartbeat failed: %s: %s", self.job.id, type(e).__name__, e)
            else:
                if not held:
                    self._expire("its lease is gone from the started registry (the janitor took the job back)")
                self._last_ok = sent
            if time.monotonic() - self._last_ok > give_up:
                self._expire(f"no lease heartbeat succeeded for {time.monotonic() - self._last_ok:.1f} s")

    def _beat(self) -> bool:
        """Renew the lease and the worker's key in one round trip, as rq's `maintain_heartbeats` does;
        False if the job's entry is gone. XX: a beat never re-adds an entry that rq removed."""
        with self.redis.pipeline() as pipe:
            self.worker.heartbeat(self.worker.job_monitoring_interval + 60, pipeline=pipe)
            self.execution.heartbeat(self.registry, self.lease_s, pipeline=pipe)  # ZADD XX rq:wip:<queue>
            pipe.zscore(self.registry.key, self.execution.composite_key)
            results = pipe.execute()
        if results[0] == 1:  # the worker's hash had expired: write it whole again, as rq does
            self.redis.hset(self.worker.key, mapping=self.worker.serialize())
        return results[-1] is not None

    def _expire(self, why: str) -> None:
        if self._stopped.is_set():  # the job ended meanwhile: nothing is left to guard
            return
        log.error(
            "job %s: %s; exiting with code %d so that it is redone, not run on unguarded",
            self.job.id,
            why,
            LEASE_LOST_EXIT_CODE,
        )
        os._exit(LEASE_LOST_EXIT_CODE)
