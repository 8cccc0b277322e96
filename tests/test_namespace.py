"""EMBEDPIPE_NAMESPACE: two pipelines share one Redis without seeing each other's keys, queues, jobs,
dead letters or counters; the default namespace keeps the names every deployment has today."""

from __future__ import annotations

import json

import pytest
from redis import Redis
from rq import Queue

from shared.errors import ConfigError
from shared.queues import job_id, queue_name, stage_of
from shared.settings import Settings
from shared.store import open_store

from .helpers import cli_env, embedpipe, short_documents, worker_pool


def test_the_default_namespace_keeps_todays_names_and_a_namespace_prefixes_them_all():
    default, staging = Settings().keys, Settings(namespace="staging").keys
    assert (default.INBOX, default.DEAD, default.kept_ids("t"), default.sources("b")) == (
        "embedpipe:inbox",
        "embedpipe:dead",
        "embedpipe:kept:t",
        "embedpipe:sources:b",
    )
    assert (queue_name("embed", ""), job_id("load", ("b1",), "")) == ("embed", "load_b1")
    named = [getattr(staging, n) for n in dir(staging) if n.isupper()]
    named += [staging.inbox_taken("j"), staging.dead_source("d"), *staging.batch_keys("b", 2)]
    assert named and all(k.startswith("embedpipe:ns:staging:") for k in named)
    assert (queue_name("embed", "staging"), job_id("load", ("b1",), "staging")) == ("staging:embed", "staging_load_b1")
    assert stage_of("staging:embed") == stage_of("embed") == "embed"
    for bad in ("Staging", "a:b", "a b", "-x", "x" * 33):
        with pytest.raises(ConfigError, match="EMBEDPIPE_NAMESPACE"):
            Settings(namespace=bad).validated()


@pytest.mark.slow
def test_two_namespaces_on_one_redis_do_not_cross(tmp_path, redis_url):
    redis = Redis.from_url(redis_url)
    docs = short_documents(40)
    envs, sent = {}, {}
    for i, ns in enumerate(("alpha", "beta")):
        envs[ns] = cli_env(
            EMBEDPIPE_REDIS_URL=redis_url,
            EMBEDPIPE_NAMESPACE=ns,
            EMBEDPIPE_STORE=str(tmp_path / f"store-{ns}"),
            EMBEDPIPE_INBOX_WAIT_S="0.2",
            EMBEDPIPE_BATCH_DOCS="8",
        )
        sent[ns] = [dict(d, id=f"{ns}-{d['id']}") for d in docs[i * 20 : (i + 1) * 20]]
        (tmp_path / f"{ns}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in sent[ns]))
    with (
        worker_pool(envs["alpha"], tmp_path / "logs-alpha", redis) as alpha,
        worker_pool(envs["beta"], tmp_path / "logs-beta", redis) as beta,
    ):
        # alpha through the inbox (its janitor batches it), beta straight into its load queue
        embedpipe("enqueue", "--inbox", str(tmp_path / "alpha.jsonl"), env=envs["alpha"])
        embedpipe("enqueue", str(tmp_path / "beta.jsonl"), env=envs["beta"])
        for ns in envs:
            embedpipe("wait", "--timeout", "600", env=envs[ns], timeout=660)
        statuses = {ns: json.loads(embedpipe("status", "--json", env=envs[ns]).stdout) for ns in envs}
        # a sync of beta that lists a quarter of it: its writer refuses the prune (a dead letter, in beta only)
        (tmp_path / "beta-part.jsonl").write_text("".join(json.dumps(d) + "\n" for d in sent["beta"][:5]))
        embedpipe("enqueue", str(tmp_path / "beta-part.jsonl"), "--prune", env=envs["beta"])
        embedpipe("wait", "--timeout", "600", env=envs["beta"], timeout=660)
        refused = {ns: json.loads(embedpipe("failed", "--json", env=envs[ns]).stdout)["failed"] for ns in envs}
        no_ns = {k: v for k, v in envs["beta"].items() if k != "EMBEDPIPE_NAMESPACE"}
        by_flag = json.loads(embedpipe("status", "--json", "--namespace", "beta", env=no_ns).stdout)
        default = json.loads(embedpipe("status", "--json", env=no_ns).stdout)
        queues = {q.name for q in Queue.all(connection=redis)}  # what `rq info` lists
    alpha.assert_clean_exit()
    beta.assert_clean_exit()

    ((letter,), none) = refused["beta"], refused["alpha"]
    assert not none and letter["doc_id"].startswith("prune:") and "delete 15 of the 20 documents" in letter["message"]
    for ns in envs:
        assert set(open_store(envs[ns]["EMBEDPIPE_STORE"]).doc_ids()) == {d["id"] for d in sent[ns]}, ns
        status = statuses[ns]
        assert (status["documents_done"], status["documents_failed"]) == (20, 0), ns
        assert all(s["workers"] == 1 for s in status["stages"].values()), ns  # its own pool, not the other's
    assert by_flag["documents_done"] == 20 and by_flag["stages"] == statuses["beta"]["stages"]
    assert default["documents_done"] == 0 and all(s["workers"] == 0 for s in default["stages"].values())
    assert {f"{ns}:{s}" for ns in envs for s in ("load", "chunk", "embed", "write")} <= queues
    assert not {"load", "chunk", "embed", "write"} & queues
    ours = {k.decode() for k in redis.keys("embedpipe:*")}
    shared_on_purpose = {k for k in ours if k.startswith("embedpipe:vcache:")}  # content-addressed
    assert ours - shared_on_purpose and all(k.startswith("embedpipe:ns:") for k in ours - shared_on_purpose)
