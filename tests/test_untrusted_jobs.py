"""Workers run only embedpipe's stage functions, and never unpickle what they read from Redis."""

from __future__ import annotations

import http.server
import pickle
import threading
from typing import ClassVar

from redis import Redis
from rq import Callback, Queue
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.webhook import Webhook

from shared import keys
from shared.messages import pack
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
    worker = StageWorker([ctx.queues["load"]], context=ctx, connection=redis, serializer=JSONSerializer)
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


class _Recorder(http.server.BaseHTTPRequestHandler):
    requests: ClassVar[list[str]] = []

    def do_GET(self):
        _Recorder.requests.append(self.path)
        self.send_response(200)
        self.end_headers()

    do_POST = do_GET

    def log_message(self, *args):
        pass


def test_callbacks_webhooks_dependencies_and_foreign_arguments_are_refused_and_disarmed(redis_url, capsys):
    """rq acts on more of a job than its function: callbacks it imports and calls, webhooks it posts,
    dependencies it waits for. A job carrying any of them, or arguments its stage does not take, is
    refused before any of it runs, and its hash loses them."""
    redis = Redis.from_url(redis_url)
    server = http.server.HTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    hook = f"http://127.0.0.1:{server.server_port}/stolen"
    q = Queue("load", connection=redis, serializer=JSONSerializer)
    # a refused function whose failure callback is print and whose failure posts the traceback
    q.enqueue_call(
        "os.system",
        args=("true",),
        job_id="noisy",
        on_failure=Callback("builtins.print"),
        webhooks=[Webhook(hook, "failed", method="POST")],
    )
    # embedpipe's own stage function, dressed up
    redis.set(keys.DEFAULT.sources("b1"), pack([{"id": "d", "text": "would be loaded"}]))
    q.enqueue_call("workers.load.load_job", args=("b1",), job_id="cb", on_success=Callback("builtins.print"))
    q.enqueue_call("workers.load.load_job", args=("b1",), job_id="hooked", webhooks=[Webhook(hook, "finished")])
    q.enqueue_call("workers.load.load_job", args=("b1",), kwargs={"extra": 1}, job_id="kwargs")
    q.enqueue_call("workers.load.load_job", args=("b1", 2), job_id="two-args")
    q.enqueue_call("workers.load.load_job", args=(7,), job_id="not-a-string")

    ctx = init_context(Settings.from_env({}, redis_url=redis_url, job_retries=0), "load", redis)
    StageWorker([ctx.queues["load"]], context=ctx, connection=redis, serializer=JSONSerializer).work(burst=True)
    server.shutdown()
    server.server_close()

    ids = ["noisy", "cb", "hooked", "kwargs", "two-args", "not-a-string"]
    for job_id in ids:
        job = Job.fetch(job_id, connection=redis, serializer=JSONSerializer)
        assert job.is_failed and "refused" in job.latest_result().exc_string, job_id
        armed = (
            "success_callback_name",
            "failure_callback_name",
            "stopped_callback_name",
            "webhooks",
            "dependency_ids",
        )
        assert not any(redis.hmget(job.key, armed)), (job_id, redis.hmget(job.key, armed))  # absent or empty
    assert _Recorder.requests == []  # no webhook was sent
    assert capsys.readouterr().out == ""  # print was never called
    assert Queue("chunk", connection=redis, serializer=JSONSerializer).count == 0  # load_job never ran
    assert redis.get(keys.DEFAULT.documents("b1")) is None
