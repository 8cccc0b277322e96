"""Redis is the trust boundary: the shipped users (deploy/redis/users.acl.template, rendered by
deploy/redis/start.sh) let a producer append to the inbox and read the pipeline's state, and nothing
else: no jobs, no claim checks, no prune list; the pools run as `worker`; nobody gets in without a
password. A real redis-server started by the shipped script, real worker processes."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from redis import Redis
from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError
from rq import Queue
from rq.serializers import JSONSerializer

from shared import keys

from .helpers import EXAMPLES, REPO, cli_env, embedpipe, worker_pool
from .servers import free_port, wait_for_redis

pytestmark = pytest.mark.slow

PASSWORDS = {"ADMIN": "admin-pw-1", "WORKER": "worker-pw-2", "PRODUCER": "producer-pw-3"}


@pytest.fixture
def acl_redis(tmp_path):
    with started_redis(tmp_path) as port:
        yield port


@contextmanager
def started_redis(tmp_path, **extra: str) -> Iterator[int]:
    port = free_port()
    env = {f"EMBEDPIPE_REDIS_{who}_PASSWORD": pw for who, pw in PASSWORDS.items()}
    env |= {"PATH": "/usr/bin:/bin:/usr/local/bin", "EMBEDPIPE_REDIS_ACL_FILE": str(tmp_path / "users.acl")}
    env |= extra
    args = ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path), "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen([str(REPO / "deploy" / "redis" / "start.sh"), *args], env=env, stdout=subprocess.DEVNULL)
    try:
        wait_for_redis(Redis(port=port, username="admin", password=PASSWORDS["ADMIN"]))
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def client(port: int, who: str) -> Redis:
    return Redis(port=port, username=who.lower(), password=PASSWORDS[who])


def as_user(port: int, who: str, **extra: str) -> dict[str, str]:
    url = f"redis://{who.lower()}@127.0.0.1:{port}/0"
    return cli_env(EMBEDPIPE_REDIS_URL=url, EMBEDPIPE_REDIS_PASSWORD=PASSWORDS[who], **extra)


def test_a_producer_may_append_to_the_inboxes_of_the_namespaces_it_is_given_and_nothing_else(tmp_path):
    with started_redis(tmp_path, EMBEDPIPE_REDIS_NAMESPACES="staging prod-2") as port:
        producer = client(port, "PRODUCER")
        for ns in ("", "staging", "prod-2"):
            producer.rpush(keys.Keyspace(ns).INBOX, b'{"v":1,"id":"a","text":"x"}')
        staging = keys.Keyspace("staging")
        for forge in [
            lambda: producer.rpush(keys.Keyspace("other").INBOX, b"x"),  # a namespace it was not given
            lambda: producer.set(staging.kept_ids("x"), b"\x91\xabno-such-doc"),
            lambda: producer.rpush(staging.dead_source("x:inbox"), b"x"),
            lambda: producer.rpush("rq:queue:staging:write", "prune_x"),
        ]:
            with pytest.raises((NoPermissionError, ResponseError)):
                forge()
        assert producer.llen(staging.INBOX) == 1


def test_a_producer_may_append_to_the_inbox_and_read_and_nothing_else(acl_redis, tmp_path):
    producer = client(acl_redis, "PRODUCER")
    producer.rpush(keys.DEFAULT.INBOX, b'{"v":1,"id":"a","text":"x"}')
    producer.lpush(keys.DEFAULT.INBOX, b'{"v":1,"id":"b","text":"x"}')
    assert producer.llen(keys.DEFAULT.INBOX) == 2 and producer.hgetall(keys.DEFAULT.COUNTERS) == {}
    # what a review did with a producer's reach: a forged prune list and a prune job emptied a store
    forgeries = [
        lambda: producer.set(keys.DEFAULT.kept_ids("x"), b"\x91\xabno-such-doc"),
        lambda: producer.rpush("rq:queue:write", "prune_x"),
        lambda: Queue("write", connection=producer, serializer=JSONSerializer).enqueue_call(
            "workers.write.prune_job", args=("x",)
        ),
        lambda: producer.delete(keys.DEFAULT.INBOX),
        lambda: producer.lpop(keys.DEFAULT.INBOX),
        lambda: producer.hset(keys.DEFAULT.DEAD, "a", "forged"),
        lambda: producer.flushdb(),
        lambda: producer.config_get("*"),
    ]
    for forge in forgeries:
        with pytest.raises((NoPermissionError, ResponseError)):
            forge()
    assert client(acl_redis, "ADMIN").llen(keys.DEFAULT.INBOX) == 2 and not client(acl_redis, "ADMIN").exists(
        "rq:queue:write"
    )
    with pytest.raises((AuthenticationError, ResponseError)):  # no password, no entry
        Redis(port=acl_redis).ping()
    with pytest.raises((AuthenticationError, ResponseError)):
        Redis(port=acl_redis, username="worker", password="guess").ping()
    # the CLI as a producer: status reads, --inbox submits; a direct enqueue is one clear line
    env = as_user(acl_redis, "PRODUCER")
    assert json.loads(embedpipe("status", "--json", env=env).stdout)["inbox"] == 2
    (tmp_path / "note.txt").write_text("Tea is steeped at 80 degrees.")
    assert (
        "pushed to the inbox 1 documents" in embedpipe("enqueue", "--inbox", str(tmp_path / "note.txt"), env=env).stdout
    )
    direct = embedpipe("enqueue", str(tmp_path / "note.txt"), env=env, check=False)
    assert direct.returncode == 1 and "Traceback" not in direct.stderr and "permission" in direct.stderr.lower()


def test_the_pools_run_as_the_worker_user_and_cannot_touch_the_server(acl_redis, tmp_path):
    worker = client(acl_redis, "WORKER")
    for forbidden in (worker.flushall, lambda: worker.config_get("*"), lambda: worker.keys("*")):
        with pytest.raises((NoPermissionError, ResponseError)):
            forbidden()
    env = as_user(acl_redis, "WORKER", EMBEDPIPE_STORE=str(tmp_path / "store"), EMBEDPIPE_INBOX_WAIT_S="0.2")
    with worker_pool(env, tmp_path / "logs", worker) as pool:
        producer_env = as_user(acl_redis, "PRODUCER")
        embedpipe("enqueue", "--inbox", str(EXAMPLES / "docs"), env=producer_env)
        embedpipe("wait", "--timeout", "300", env=producer_env, timeout=330)  # a producer may watch
        status = json.loads(embedpipe("status", "--json", env=producer_env).stdout)
        failed = json.loads(embedpipe("failed", "--json", "--redis", env=producer_env).stdout)["failed"]
    pool.assert_clean_exit()
    docs = len([p for p in (EXAMPLES / "docs").iterdir() if p.is_file()])
    assert failed == [] and status["documents_done"] == docs
    assert "NOPERM" not in "".join(p.read_text() for p in (tmp_path / "logs").iterdir())
