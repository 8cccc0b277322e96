"""Workers run only embedpipe's stage functions, and never unpickle what they read from Redis."""

from __future__ import annotations

import pickle

from redis import Redis
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from shared.settings import Settings
from workers.janitor import expand_failed_jobs
from workers.runtime import StageWorker, init_context


def test_a_job_naming_another_function_is_refused_and_never_runs(redis_url, tmp_path):
    redis = Redis.from_url(redis_url)
    marker = tmp_path / "pwned"
    q = Queue("load", connection=redis, serializer=JSONSerializer)
    q.enqueue_call("os.system", args=(f"touch {marker}",), job_id="evil")
    # a pickled payload too: rq's default serializer would unpickle it (pickle runs code on load)
    evil_pickle = pickle.dumps(("os.system", None, (f"touch {marker}",), {}))
    redis.hset(
        "rq:job:pickled", mapping={"data": evil_pickle, "status": "queued", "created_at": "2026-01-01T00:00:00.000000Z"}
    )
    redis.rpush("rq:queue:load", "pickled")

    ctx = init_context(Settings.from_env({}, redis_url=redis_url, job_retries=0), "load", redis)
    worker = StageWorker([ctx.queues["load"]], connection=redis, serializer=JSONSerializer)
    worker.work(burst=True)

    assert not marker.exists()
    refused = Job.fetch("evil", connection=redis, serializer=JSONSerializer)
    assert refused.is_failed and "not an embedpipe stage" in refused.latest_result().exc_string
    assert q.count == 0

    # the janitor records it (a dead letter per job it cannot map to documents) and clears the registry
    expand_failed_jobs(redis, ctx.settings, ctx.ledger)
    letters = {d.doc_id: d for d in ctx.ledger.dead()}
    assert letters["job:evil"].reason == "job_failed" and "os.system" in letters["job:evil"].message
    assert q.failed_job_registry.count == 0
