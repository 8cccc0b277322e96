"""Shared by the integration tests and benchmarks: what a run must have stored, and which worker
process runs a job."""

from __future__ import annotations

import json
import time

from redis import Redis
from rq import Worker
from rq.executions import Execution

from shared.messages import SourceDoc
from shared.settings import Settings
from shared.spec import chunk_policy
from shared.store import open_store
from workers.chunk import chunk_batch
from workers.load import load_batch
from workers.runtime import queue

from .conftest import embedpipe
from .pool import Pool


def expected_chunks(tokenizer, sources: list[SourceDoc]) -> dict[str, set[str]]:
    docs, dead = load_batch([s.to_dict() for s in sources], 10**7)
    assert not dead
    policy = chunk_policy(Settings(), tokenizer)
    expected: dict[str, set[str]] = {d.id: set() for d in docs}
    for c in chunk_batch(docs, tokenizer, policy):
        expected[c.doc_id].add(c.chunk_id)
    return expected


def assert_nothing_lost(env: dict[str, str], expected: dict[str, set[str]]) -> dict[str, int]:
    """Each document is either stored with exactly its chunks, or a dead letter: never both, never neither."""
    store = open_store(env["EMBEDPIPE_STORE"])
    stored = store.chunk_ids(list(expected))
    dead = {d["doc_id"] for d in json.loads(embedpipe("failed", "--json", env=env).stdout)}
    complete = {d for d, ids in stored.items() if ids == expected[d]}
    partial = {d for d, ids in stored.items() if ids and ids != expected[d]}
    lost = set(expected) - complete - dead
    assert not partial, f"partly stored: {sorted(partial)[:10]}"
    assert not (complete & dead), f"stored and dead: {sorted(complete & dead)[:10]}"
    assert not lost, f"lost: {len(lost)} documents, e.g. {sorted(lost)[:10]}"
    assert store.count() == sum(len(expected[d]) for d in complete), "duplicate or foreign chunks"
    return {"stored": len(complete), "dead": len(dead & set(expected))}


def running_job(redis: Redis, stage: str, timeout_s: float = 240) -> tuple[str, str]:
    """The first job of `stage` seen running, and the name of the rq worker running it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for job_id, execution_id in queue(redis, stage).started_job_registry.get_job_and_execution_ids(cleanup=False):
            try:
                return job_id, Execution.fetch(execution_id, job_id, redis).worker_name
            except ValueError:  # it ended meanwhile
                continue
        time.sleep(0.1)
    raise AssertionError(f"no {stage} job ran within {timeout_s} s")


def process_of(pool: Pool, redis: Redis, worker_name: str) -> str:
    """The pool's name (embed-0, ...) of the process that runs rq worker `worker_name`."""
    pid = Worker.find_by_key(Worker.redis_worker_namespace_prefix + worker_name, connection=redis).pid
    return next(name for name, p in pool.procs.items() if p.pid == pid)
