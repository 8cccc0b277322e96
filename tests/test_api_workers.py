"""API models in real worker processes against tests/openai_server.py: two embedder processes share one
rate budget through Redis; a bad key and chunks the API refuses become dead letters that never show the
key, in both runtimes. (The in-process embedder: tests/test_api_backend.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis import Redis

from producer.sources import iter_sources, resolve
from shared import keys
from shared.ledger import RedisLedger
from shared.ratelimit import Limits
from shared.settings import Settings
from shared.spec import chunk_policy
from shared.store import open_store
from shared.tokenizer_api import ApiTokenizer
from workers.chunk import chunk_batch

from .helpers import REPO, SECRET, SMALL, WORDS, assert_windows, cli_env, embedpipe, texts, worker_pool
from .openai_server import FakeOpenAI, serve
from .servers import free_port

# --- two embedder processes, one account --------------------------------------------------------


def _start_server(log: Path, *args: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.openai_server", "--port", str(port), *args],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    deadline = time.monotonic() + 60
    while True:
        try:
            _get(f"http://127.0.0.1:{port}/log")
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def _metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(_get(f"http://127.0.0.1:{port}/metrics")):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture
def fake_process(tmp_path):
    procs = []

    def start(*args: str) -> str:
        proc, url = _start_server(tmp_path / f"server-{len(procs)}.log", *args)
        procs.append(proc)
        return url

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(10)


def write_corpus(root: Path, n: int) -> list[str]:
    root.mkdir()
    bodies = texts(n, words=8)
    for i, body in enumerate(bodies):
        (root / f"note-{i:03d}.txt").write_text(body + "\n")
    return bodies


@pytest.mark.slow
def test_two_embedder_processes_share_one_rate_budget(redis_url, tmp_path, fake_process):
    """Two `embedpipe worker embed` processes (and the other pools) against one server: the server
    measures every window; the shared budget keeps requests and tokens within its bound, with no 429."""
    from producer.sources import iter_sources, resolve
    from shared.store import open_store
    from workers.load import load_batch

    rpm, tpm = 120, 8_000  # both bind: ~84 tokens per request
    base = fake_process("--rpm", str(rpm), "--tpm", str(tpm))
    write_corpus(tmp_path / "corpus", 96)
    env = cli_env(
        EMBEDPIPE_REDIS_URL=redis_url,
        EMBEDPIPE_STORE=str(tmp_path / "store"),
        EMBEDPIPE_MODEL=SMALL,
        EMBEDPIPE_OPENAI_BASE_URL=base + "/v1",
        EMBEDPIPE_OPENAI_API_KEY="test-key",
        EMBEDPIPE_API_RPM=str(rpm),
        EMBEDPIPE_API_TPM=str(tpm),
        EMBEDPIPE_API_MAX_INPUTS="4",
        EMBEDPIPE_API_MAX_INPUT_TOKENS="256",
        EMBEDPIPE_BATCH_DOCS="16",
        EMBEDPIPE_PART_MAX_CHUNKS="16",
        EMBEDPIPE_INBOX_WAIT_S="0.2",
        EMBEDPIPE_LOG_LEVEL="INFO",
    )
    redis = Redis.from_url(redis_url)
    try:
        with worker_pool(
            env, tmp_path / "logs", redis, workers={"load": 1, "chunk": 1, "embed": 2, "write": 1}, metrics=True
        ) as pool:
            embedpipe("enqueue", str(tmp_path / "corpus"), env=env)
            embedpipe("wait", "--timeout", "300", env=env, timeout=330)
            scraped = [_metrics(pool.metrics_ports[f"embed-{i}"]) for i in range(2)]
            status = json.loads(embedpipe("status", "--json", env=env).stdout)
            failed = json.loads(embedpipe("failed", "--json", env=env).stdout)["failed"]
    finally:
        redis.close()
    pool.assert_clean_exit()
    assert failed == [] and status["documents_done"] == 96

    log = json.loads(_get(base + "/log"))["requests"]
    assert [r["status"] for r in log] == [200] * len(log)  # the server never had to say 429
    limits = Limits.from_settings(rpm, tpm, 256)
    jitter_s = 0.5  # send -> arrival varies; the bound is on send times
    sends = [(r["t"], sum(r["tokens"]), i) for i, r in enumerate(log)]
    assert_windows([(t, n, i) for t, n, i in sends], limits_with_slack(limits, jitter_s), (1.0, 2.0, 5.0))
    assert len(log) >= 24 and all(r["inputs"] <= 4 for r in log)

    key = ("model", "text-embedding-3-small")
    per_worker = [m.get(("embedpipe_api_requests_total", (key, ("outcome", "ok"))), 0) for m in scraped]
    assert all(n > 0 for n in per_worker) and sum(per_worker) == len(log)  # both processes worked
    tokens = sum(m[("embedpipe_api_tokens_total", (key,))] for m in scraped)
    cost = sum(m[("embedpipe_api_cost_usd_total", (key,))] for m in scraped)
    waited = sum(m[("embedpipe_api_rate_limit_wait_seconds_total", (key,))] for m in scraped)
    assert tokens == sum(n for _, n, _ in sends)  # exactly what the server billed
    assert cost == pytest.approx(tokens * 0.02 / 1e6, rel=1e-9)
    assert waited > 0  # the budget, not luck, spaced the requests
    print(f"\nrate test: {len(log)} requests, {tokens} tokens, ${cost:.8f}, {waited:.1f} s waited, {_peaks(sends)}")

    # The vectors stored are the server's, row for row.
    sources = [s.to_dict() for s in iter_sources(resolve([str(tmp_path / "corpus")]), 10**8)]
    docs, _ = load_batch(sources, 10**8)
    tok = ApiTokenizer(SMALL)
    chunks = chunk_batch(docs, tok, chunk_policy(Settings(), tok))
    store = open_store(str(tmp_path / "store"))
    try:
        stored = dict(store.vectors())
    finally:
        store.close()
    assert set(stored) == {c.chunk_id for c in chunks}
    for c in chunks:
        np.testing.assert_allclose(stored[c.chunk_id], FakeOpenAI.vector(c.text, 1536), atol=1e-6)


def limits_with_slack(limits: Limits, jitter_s: float) -> Limits:
    """The bound C + r*(W + jitter): what a server can see of a budget kept at send time."""
    from dataclasses import replace

    return Limits(
        *(replace(x, capacity=x.capacity + x.rate * jitter_s) for x in (limits.requests, limits.tokens))  # type: ignore[arg-type]
    )


def _peaks(sends: list[tuple[float, int, int]]) -> str:
    out = []
    for w in (1.0, 5.0, 60.0):
        most = max(sum(1 for s in sends if t <= s[0] <= t + w) for t, _, _ in sends)
        most_tokens = max(sum(s[1] for s in sends if t <= s[0] <= t + w) for t, _, _ in sends)
        out.append(f"max {most} requests / {most_tokens} tokens in {w:g} s")
    return "; ".join(out)


@pytest.mark.slow
def test_a_bad_key_in_a_worker_becomes_dead_letters_that_never_show_it(redis_url, tmp_path, fake_process):
    (tmp_path / "right").write_text("the-right-key\n")
    (tmp_path / "wrong").write_text(SECRET + "\n")
    base = fake_process("--api-key-file", str(tmp_path / "right"))
    write_corpus(tmp_path / "corpus", 3)
    env = cli_env(
        EMBEDPIPE_REDIS_URL=redis_url,
        EMBEDPIPE_STORE=str(tmp_path / "store"),
        EMBEDPIPE_MODEL=SMALL,
        EMBEDPIPE_OPENAI_BASE_URL=base + "/v1",
        EMBEDPIPE_OPENAI_API_KEY_FILE=str(tmp_path / "wrong"),
        EMBEDPIPE_JOB_RETRIES="0",
        EMBEDPIPE_INBOX_WAIT_S="0.2",
        EMBEDPIPE_LOG_LEVEL="DEBUG",
    )
    redis = Redis.from_url(redis_url)
    try:
        with worker_pool(env, tmp_path / "logs", redis) as pool:
            embedpipe("enqueue", str(tmp_path / "corpus"), env=env)
            embedpipe("wait", "--timeout", "120", env=env, timeout=150)
            failed = json.loads(embedpipe("failed", "--json", env=env).stdout)["failed"]
            stored = _all_values(redis)
    finally:
        redis.close()
    assert {f["doc_id"] for f in failed} == {f"note-{i:03d}.txt" for i in range(3)}
    assert all("401" in f["message"] and "EMBEDPIPE_OPENAI_API_KEY" in f["message"] for f in failed)
    assert json.loads(_get(base + "/log"))["requests"][0]["status"] == 401  # the server quoted the key back
    logs = "".join(p.read_text(errors="replace") for p in pool.logs.iterdir())
    assert "refused the API key (401)" in logs
    for where, text in (("logs", logs), ("dead letters", json.dumps(failed)), ("redis", stored)):
        assert SECRET not in text and SECRET[:12] not in text, f"the key shows in {where}"


def _all_values(redis: Redis) -> str:
    """Every key and value in the database, as text."""
    out = []
    for key in redis.scan_iter(count=1000):
        kind = redis.type(key).decode()
        value = {
            "string": lambda k: [redis.get(k)],
            "hash": lambda k: [x for kv in redis.hgetall(k).items() for x in kv],
            "list": lambda k: redis.lrange(k, 0, -1),
            "set": lambda k: list(redis.smembers(k)),
            "zset": lambda k: redis.zrange(k, 0, -1),
        }.get(kind, lambda k: [])(key)
        out += [key, *[v for v in value if v is not None]]
    return "\n".join(x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x) for x in out)


def _refusal_corpus(root: Path) -> dict[str, str]:
    """Short documents the server embeds, and two whose single chunk is over its 40-token limit."""
    root.mkdir()
    docs = {f"ok-{i}.txt": f"Short note number {i} about tea." for i in range(4)}
    docs |= {f"long-{i}.txt": " ".join(WORDS * (4 + i)) for i in range(2)}
    for name, text in docs.items():
        (root / name).write_text(text)
    return docs


def _assert_refused_documents_are_dead_letters(
    store: str, letters: list, docs: dict[str, str], counters: dict[str, int]
) -> None:
    """The refused documents are model_error dead letters with no chunk stored, the others are stored, and
    the runtime counted alike: the stored documents and their chunks, not the refused ones'."""
    refused = {d for d in docs if d.startswith("long-")}
    assert {d["doc_id"] if isinstance(d, dict) else d.doc_id for d in letters} == refused
    for d in letters:
        reason = d["reason"] if isinstance(d, dict) else d.reason
        message = d["message"] if isinstance(d, dict) else d.message
        assert reason == "model_error" and "maximum context length is 40 tokens" in message
    handle = open_store(store)
    assert set(handle.doc_ids()) == set(docs) - refused
    assert handle.chunk_ids(sorted(refused)) == {d: set() for d in refused}
    assert len(handle.chunk_ids(sorted(set(docs) - refused))) == 4
    assert counters == {"documents_done": 4, "chunks_written": handle.count(), "documents_skipped": 0}
    handle.close()


def test_chunks_the_api_refuses_make_their_documents_dead_letters_embedded(tmp_path):
    """The pipeline, not just the embedder: a refused chunk's document is a model_error dead letter
    with the API's message and its source kept; every other document is stored."""
    from shared.ledger import LocalLedger, local_ledger_path
    from workers.embedded import run_embedded

    docs = _refusal_corpus(tmp_path / "corpus")
    store = str(tmp_path / "store")
    with serve(max_input_tokens=40) as server:
        settings = Settings.from_env(
            {}, model=SMALL, openai_base_url=server.url, openai_api_key="k", store=store, chunk_tokens=200
        )
        summary = run_embedded(settings, iter_sources(resolve([str(tmp_path / "corpus")]), 10**6))
    assert (summary.documents, summary.documents_stored, summary.failed) == (6, 4, 2)
    ledger = LocalLedger(local_ledger_path(tmp_path / "store"))
    letters = ledger.dead()
    _assert_refused_documents_are_dead_letters(store, letters, docs, ledger.counters())
    assert all(ledger.source(d.doc_id)["text"] == docs[d.doc_id] for d in letters)  # kept for redrive


@pytest.mark.slow
def test_chunks_the_api_refuses_make_their_documents_dead_letters_distributed(tmp_path, redis_url):
    docs = _refusal_corpus(tmp_path / "corpus")
    proc, url = _start_server(tmp_path / "server.log", "--max-input-tokens", "40")
    store = str(tmp_path / "store")
    env = cli_env(
        EMBEDPIPE_REDIS_URL=redis_url,
        EMBEDPIPE_STORE=store,
        EMBEDPIPE_MODEL=SMALL,
        EMBEDPIPE_OPENAI_BASE_URL=url + "/v1",
        EMBEDPIPE_OPENAI_API_KEY="k",
        EMBEDPIPE_CHUNK_TOKENS="200",
        EMBEDPIPE_INBOX_WAIT_S="0.2",
    )
    try:
        with worker_pool(env, tmp_path / "logs", Redis.from_url(redis_url)) as pool:
            embedpipe("enqueue", str(tmp_path / "corpus"), env=env)
            embedpipe("wait", "--timeout", "300", env=env, timeout=360)
            letters = json.loads(embedpipe("failed", "--json", "--redis", env=env).stdout)["failed"]
    finally:
        proc.terminate()
        proc.wait(30)
    pool.assert_clean_exit()
    counters = RedisLedger(Redis.from_url(redis_url), keys.DEFAULT).counters()
    _assert_refused_documents_are_dead_letters(store, letters, docs, counters)


@pytest.mark.slow
def test_a_rate_limit_longer_than_the_deadline_delays_embed_jobs_and_spends_no_retry(redis_url, tmp_path, fake_process):
    """The server rate-limits the first requests for longer than the API deadline. Before, each such
    job failed, spent an rq retry and, with its retries gone, dead-lettered its documents; now it is
    rescheduled for when the limit lifts, its retries untouched, and every document is stored."""
    from rq import Queue
    from rq.job import Job
    from rq.serializers import JSONSerializer

    base = fake_process()
    faults = [{"kind": "status", "status": 429, "retry_after": 3}] * 3
    request = urllib.request.Request(base + "/faults", data=json.dumps(faults).encode(), method="POST")
    urllib.request.urlopen(request).read()
    write_corpus(tmp_path / "corpus", 8)
    env = cli_env(
        EMBEDPIPE_REDIS_URL=redis_url,
        EMBEDPIPE_STORE=str(tmp_path / "store"),
        EMBEDPIPE_MODEL=SMALL,
        EMBEDPIPE_OPENAI_BASE_URL=base + "/v1",
        EMBEDPIPE_OPENAI_API_KEY="test-key",
        EMBEDPIPE_API_DEADLINE_S="1",  # every 429 here (3 s) outlasts it
        EMBEDPIPE_JOB_RETRIES="1",  # one rq retry: spending it on the limit would dead-letter everything
        EMBEDPIPE_INBOX_WAIT_S="0.2",
        EMBEDPIPE_LOG_LEVEL="INFO",
    )
    redis = Redis.from_url(redis_url)
    with worker_pool(env, tmp_path / "logs", redis, workers={"load": 1, "chunk": 1, "embed": 1, "write": 1}) as pool:
        embedpipe("enqueue", str(tmp_path / "corpus"), env=env)
        embedpipe("wait", "--timeout", "120", env=env, timeout=150)
        status = json.loads(embedpipe("status", "--json", env=env).stdout)
        failed = json.loads(embedpipe("failed", "--json", env=env).stdout)["failed"]
    pool.assert_clean_exit()
    assert failed == [] and status["documents_done"] == 8
    [embed_job] = Queue("embed", connection=redis, serializer=JSONSerializer).finished_job_registry.get_job_ids()
    job = Job.fetch(embed_job, connection=redis, serializer=JSONSerializer)
    assert job.retries_left == 1  # not one rq retry spent on the rate limit
    assert job.number_of_retries >= 2  # it was put back for later, more than once
    log = json.loads(_get(base + "/log"))["requests"]
    assert [r["status"] for r in log].count(429) == 3 and log[-1]["status"] == 200
    assert "back in 3 s" in (tmp_path / "logs" / "embed-0.log").read_text()
